"""``manage.py clickhouse_schema``: create the ClickHouse database and facts table, or add missing columns."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering.delivery.sinks.base import SinkNotConfigured
from metering.delivery.sinks.clickhouse import ClickHouseSink, create_table_sql, ensure_schema, table_name


class Command(BaseCommand):
    help = (
        "Create METERING['CLICKHOUSE_DATABASE'].CLICKHOUSE_TABLE (a ReplacingMergeTree partitioned by month, ordered "
        "by tenant, feature, time) or add the columns an older one lacks. Idempotent."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--print", action="store_true", help="Print the CREATE TABLE statement, run nothing.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            if options["print"]:
                self.stdout.write(create_table_sql(table_name()))
                return
            done = ensure_schema(ClickHouseSink())
        except SinkNotConfigured as error:
            raise CommandError(str(error)) from error
        for line in done:
            self.stdout.write(line)
        self.stdout.write(f"{table_name()}: up to date" if not done else f"{table_name()}: {len(done)} changes")
