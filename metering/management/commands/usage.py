"""``manage.py usage TENANT_ID``: a tenant subtree's usage in the current hour, day, month (UTC) or in total.

``manage.py usage --tree [TENANT_ID]``: the tenant tree (``tenant tree``'s listing) with each tenant's subtree
usage in the same window, every tenant of the listing from one query.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering.events import validate_feature_name
from metering.exceptions import InvalidUsageEvent
from metering.usage import get_usage, usage_by_feature, usage_by_tenant_and_feature
from metering.windows import PERIODS, Period, window
from tenants.exceptions import TenantError
from tenants.lineage import get_context
from tenants.listing import label, subtree_rows, walk


class Command(BaseCommand):
    help = (
        "Show the usage of a tenant's whole subtree in the window of --period that holds now (UTC); with --tree, "
        "the tenant tree (or TENANT_ID's subtree) with each tenant's usage."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("tenant_id", nargs="?", help="Required without --tree; with it, the top of the listing.")
        parser.add_argument("--feature", help="Only this feature (default: every feature used in the window).")
        parser.add_argument("--period", choices=PERIODS, default="month")
        parser.add_argument("--tree", action="store_true", help="Every tenant of the tree, indented, with its usage.")
        parser.add_argument(
            "--json",
            action="store_true",
            help='Print {"feature": "quantity", ...} only (with --tree: {"tenant id": {...}, ...}).',
        )

    def handle(self, *args: Any, **options: Any) -> None:
        period = cast(Period, options["period"])
        now = datetime.now(UTC)
        try:
            if options["tree"]:
                self.tree(options["tenant_id"], options["feature"], period, now, as_json=options["json"])
                return
            if not options["tenant_id"]:
                raise CommandError("the tenant_id argument is required (or --tree for the whole tree)")
            self.subtree(options["tenant_id"], options["feature"], period, now, as_json=options["json"])
        except (TenantError, InvalidUsageEvent) as error:
            raise CommandError(str(error)) from error

    def subtree(self, tenant_id: str, feature: str | None, period: Period, now: datetime, *, as_json: bool) -> None:
        start, end = window(period, now)
        context = get_context(tenant_id, require_active=False)
        if feature:
            usage = {feature: get_usage(context, feature, start, end)}
        else:
            usage = usage_by_feature(context, period, now)
        # Strings, not floats: quantities are exact decimals and JSON numbers would round them.
        quantities = {name: format_quantity(quantity) for name, quantity in sorted(usage.items())}
        if as_json:
            self.stdout.write(json.dumps(quantities))
            return
        span = "all time" if start is None or end is None else f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
        self.stdout.write(f"usage of {context.tenant_id} and its subtree, {period}: {span}")
        if not quantities:
            self.stdout.write("no usage")
            return
        name_width = max(len("feature"), *(len(name) for name in quantities))
        qty_width = max(len("quantity"), *(len(quantity) for quantity in quantities.values()))
        self.stdout.write(f"{'feature':<{name_width}}  {'quantity':>{qty_width}}")
        for name, quantity in quantities.items():
            self.stdout.write(f"{name:<{name_width}}  {quantity:>{qty_width}}")

    def tree(self, root_id: str | None, feature: str | None, period: Period, now: datetime, *, as_json: bool) -> None:
        if feature:
            feature = validate_feature_name(feature)
        rows = subtree_rows(root_id)
        usage = usage_by_tenant_and_feature([row.pk for row in rows], period, now) if rows else {}
        listing: dict[str, dict[str, str]] = {}
        lines: list[str] = []
        for depth, tenant in walk(rows):
            features = usage.get(tenant.pk, {})
            if feature:
                features = {feature: features[feature]} if feature in features else {}
            quantities = {name: format_quantity(quantity) for name, quantity in sorted(features.items())}
            listing[tenant.external_id] = quantities
            line = "  " * depth + label(tenant)
            if quantities:
                line += "  " + " ".join(f"{name}={quantity}" for name, quantity in quantities.items())
            lines.append(line)
        if as_json:
            self.stdout.write(json.dumps(listing))
        elif not lines:
            self.stdout.write("no tenants")
        else:
            self.stdout.write("\n".join(lines))


def format_quantity(quantity: Decimal) -> str:
    # Fixed-point: a normalized Decimal would print 10 as "1E+1".
    return format(quantity, "f")
