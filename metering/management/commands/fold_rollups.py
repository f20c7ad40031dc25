"""``manage.py fold_rollups``: merge the rollup slots of hours that are over into one row per hour, now."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering.conf import metering_settings
from metering.rollups import fold
from metering.windows import floor_hour


class Command(BaseCommand):
    help = (
        "Merge the writers' rollup slots of every hour before the current one (or before --hours-ago hours ago) into "
        "slot 0, so reading history is one row per hour again. Exact and safe beside running writers (rows they "
        "hold are left for the next run); the metering.fold_rollups beat task does the same."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--hours-ago", type=int, default=0, help="Fold only hours that ended this many hours ago (default 0)."
        )
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["hours_ago"] < 0:
            raise CommandError("--hours-ago must be 0 or more")
        before = floor_hour(datetime.now(UTC)) - timedelta(hours=options["hours_ago"])
        report = fold(before, using=metering_settings.DATABASE_ALIAS)
        figures = {
            "before": before.isoformat(),
            "trees": report.trees,
            "rows_folded": report.rows_folded,
            "rows_left": report.rows_left,
        }
        if options["json"]:
            self.stdout.write(json.dumps(figures))
            return
        self.stdout.write(
            f"folded {report.rows_folded} slot rows of {report.trees} trees (hours before {before:%Y-%m-%d %H:00} "
            f"UTC); {report.rows_left} left split"
        )
