"""``manage.py reconcile_usage``: recompute the hourly rollups of tenant trees from their facts, and repair them."""

from __future__ import annotations

from datetime import UTC
from decimal import Decimal
from functools import partial
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from metering import counters
from metering.conf import metering_settings
from metering.events import units_to_quantity
from metering.rollups import RollupDifference, reconcile_tree
from tenants.exceptions import TenantError
from tenants.models import Tenant
from tenants.tree import get_tenant


class Command(BaseCommand):
    help = "Check every rollup of the given root trees (default: all) against the usage facts and repair them."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("root_ids", nargs="*", metavar="ROOT_ID", help="Root tenants (default: every root).")
        parser.add_argument("--dry-run", action="store_true", help="Report the differences, change nothing.")

    def handle(self, *args: Any, **options: Any) -> None:
        dry_run: bool = options["dry_run"]
        roots = self.roots(options["root_ids"])
        using = metering_settings.DATABASE_ALIAS
        found = 0
        for root in roots:
            # reconcile_tree runs one day per transaction, each under the tree's exclusive lock.
            differences = reconcile_tree(root, repair=not dry_run, using=using)
            if not dry_run:
                # Always drop the tree's Redis counters, so the next read rebuilds them from the (repaired) rows:
                # a counter can be stale even where the rollups are right (a write Redis missed).
                transaction.on_commit(partial(counters.drop_trees, [root.pk]), using=using)
            for difference in sorted(differences, key=lambda d: (d.tenant_id, d.feature, d.bucket)):
                self.stdout.write(describe(difference))
            found += len(differences)
        verb = "found" if dry_run else "repaired"
        self.stdout.write(f"{found} differences {verb} in {len(roots)} trees")

    def roots(self, root_ids: list[str]) -> list[Tenant]:
        if not root_ids:
            return list(Tenant.objects.filter(parent__isnull=True).order_by("external_id"))
        roots: list[Tenant] = []
        for root_id in dict.fromkeys(root_ids):
            try:
                tenant = get_tenant(root_id)
            except TenantError as error:
                raise CommandError(str(error)) from error
            if tenant.parent_id is not None:
                # reconcile_tree locks and recomputes whole trees; a subtree alone would miss its ancestors' rows.
                raise CommandError(f"tenant {root_id!r} is not a root; reconcile its root tenant instead")
            roots.append(tenant)
        return roots


def describe(difference: RollupDifference) -> str:
    line = (
        f"{difference.tenant_id} {difference.feature} {difference.bucket.astimezone(UTC):%Y-%m-%d %H:00} UTC: "
        f"{format_units(difference.stored_units)} -> {format_units(difference.expected_units)}"
    )
    if difference.stored_events != difference.expected_events:
        line += f" ({difference.stored_events} -> {difference.expected_events} events)"
    return line


def format_units(units: int) -> str:
    quantity: Decimal = units_to_quantity(units)
    # Fixed-point: a normalized Decimal would print 10 as "1E+1".
    return format(quantity, "f")
