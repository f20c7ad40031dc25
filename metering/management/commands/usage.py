"""``manage.py usage TENANT_ID``: a tenant subtree's usage in the current hour, day, month (UTC) or in total."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering.exceptions import InvalidUsageEvent
from metering.usage import get_usage, usage_by_feature
from metering.windows import PERIODS, Period, window
from tenants.exceptions import TenantError
from tenants.lineage import get_context


class Command(BaseCommand):
    help = "Show the usage of a tenant's whole subtree in the window of --period that holds now (UTC)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("tenant_id")
        parser.add_argument("--feature", help="Only this feature (default: every feature used in the window).")
        parser.add_argument("--period", choices=PERIODS, default="month")
        parser.add_argument("--json", action="store_true", help='Print {"feature": "quantity", ...} only.')

    def handle(self, *args: Any, **options: Any) -> None:
        period = cast(Period, options["period"])
        now = datetime.now(UTC)
        start, end = window(period, now)
        try:
            context = get_context(options["tenant_id"], require_active=False)
            if options["feature"]:
                usage = {options["feature"]: get_usage(context, options["feature"], start, end)}
            else:
                usage = usage_by_feature(context, period, now)
        except (TenantError, InvalidUsageEvent) as error:
            raise CommandError(str(error)) from error
        # Strings, not floats: quantities are exact decimals and JSON numbers would round them.
        quantities = {feature: format_quantity(quantity) for feature, quantity in sorted(usage.items())}
        if options["json"]:
            self.stdout.write(json.dumps(quantities))
            return
        span = "all time" if start is None or end is None else f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
        self.stdout.write(f"usage of {context.tenant_id} and its subtree, {period}: {span}")
        if not quantities:
            self.stdout.write("no usage")
            return
        name_width = max(len("feature"), *(len(feature) for feature in quantities))
        qty_width = max(len("quantity"), *(len(quantity) for quantity in quantities.values()))
        self.stdout.write(f"{'feature':<{name_width}}  {'quantity':>{qty_width}}")
        for feature, quantity in quantities.items():
            self.stdout.write(f"{feature:<{name_width}}  {quantity:>{qty_width}}")


def format_quantity(quantity: Decimal) -> str:
    # Fixed-point: a normalized Decimal would print 10 as "1E+1".
    return format(quantity, "f")
