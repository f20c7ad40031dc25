"""``manage.py feature add NAME --aggregation sum|count|max|latest|unique_count [--unit U] [--property P]``,
``manage.py feature list [--json]``: the feature registry (``metering.features``)."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering.conf import metering_settings
from metering.events import validate_feature_name
from metering.exceptions import InvalidUsageEvent
from metering.features import Aggregation, define
from metering.models import FeatureDefinition


class Command(BaseCommand):
    help = "Register features (their unit and aggregation) and list the registry."

    def add_arguments(self, parser: CommandParser) -> None:
        verbs = parser.add_subparsers(dest="verb", required=True)
        add = verbs.add_parser("add", help="Register a feature, or change a registered one's unit or description.")
        add.add_argument("name")
        add.add_argument("--aggregation", choices=Aggregation.values, default=Aggregation.SUM.value)
        add.add_argument("--unit", default="")
        add.add_argument("--property", default="", help="unique_count: the metadata key whose values are counted.")
        add.add_argument(
            "--no-rollup", action="store_true", help="latest only: a level's gauge is its own facts, not its subtree's."
        )
        add.add_argument("--description", default="")
        listing = verbs.add_parser("list", help="Every registered feature.")
        listing.add_argument("--json", action="store_true", help="A JSON list of the definitions.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["verb"] == "add":
            self.add(options)
        else:
            self.list(as_json=options["json"])

    def add(self, options: dict[str, Any]) -> None:
        rows = FeatureDefinition.objects.using(metering_settings.DATABASE_ALIAS)
        try:
            existed = rows.filter(name=validate_feature_name(options["name"])).exists()
            row = define(
                options["name"],
                options["aggregation"],
                unit=options["unit"],
                property_name=options["property"],
                rolls_up=not options["no_rollup"],
                description=options["description"],
            )
        except InvalidUsageEvent as error:
            raise CommandError(f"{getattr(error, 'field', 'name')}: {error}") from error
        self.stdout.write(f"{'Updated' if existed else 'Registered'} {row}.")

    def list(self, *, as_json: bool) -> None:
        rows = FeatureDefinition.objects.using(metering_settings.DATABASE_ALIAS).order_by("name")
        if as_json:
            self.stdout.write(json.dumps([definition_json(row) for row in rows], indent=2))
            return
        if not rows:
            self.stdout.write(
                f"No registered features (registry {metering_settings.FEATURE_REGISTRY}: unregistered ones are "
                + ("sums)." if metering_settings.FEATURE_REGISTRY == "open" else "refused).")
            )
        for row in rows:
            extra = f" of {row.property_name}" if row.property_name else ""
            extra += "" if row.rolls_up else " (not rolled up)"
            self.stdout.write(f"{row.name}\t{row.aggregation}{extra}\t{row.unit}")


def definition_json(row: FeatureDefinition) -> dict[str, Any]:
    return {
        "name": row.name,
        "aggregation": row.aggregation,
        "unit": row.unit,
        "property": row.property_name,
        "rolls_up": row.rolls_up,
        "description": row.description,
    }
