"""``manage.py reconcile_usage``: recompute the hourly rollups of tenant trees from their facts, compare the live
Redis counters with them, and repair both."""

from __future__ import annotations

from datetime import UTC, date
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering import counters
from metering.conf import metering_settings
from metering.events import units_to_quantity
from metering.rollups import RollupDifference, reconcile_tree
from tenants.exceptions import TenantError
from tenants.models import Tenant
from tenants.tree import get_tenant


class Command(BaseCommand):
    help = (
        "Check every rollup of the given root trees (default: all) against the usage facts, and every live Redis "
        "counter against the rollups; repair what differs (--dry-run: report only)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("root_ids", nargs="*", metavar="ROOT_ID", help="Root tenants (default: every root).")
        parser.add_argument("--dry-run", action="store_true", help="Report the differences, change nothing.")
        parser.add_argument(
            "--sink",
            choices=["lago", "clickhouse"],
            help="Instead: compare what was delivered with what the sink holds (read-only). lago: per subscription x "
            "code x day, and facts Lago accepted but will not bill; clickhouse: the facts' totals per tenant x feature "
            "x UTC day (exit status 1 on any difference).",
        )
        parser.add_argument("--since", type=date.fromisoformat, help="With --sink lago: first day (UTC, YYYY-MM-DD).")
        parser.add_argument("--until", type=date.fromisoformat, help="With --sink lago: last day (UTC, YYYY-MM-DD).")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["sink"] == "lago":
            self.reconcile_lago(options["since"], options["until"])
            return
        if options["sink"]:
            self.reconcile_sink(options["sink"])
            return
        dry_run: bool = options["dry_run"]
        roots = self.roots(options["root_ids"])
        using = metering_settings.DATABASE_ALIAS
        found = drifted = 0
        names: dict[int, str] = {}
        for root in roots:
            # reconcile_tree runs one day per transaction, each under the tree's exclusive lock (and retires the
            # tree's counters with every day it repairs).
            differences = reconcile_tree(root, repair=not dry_run, using=using)
            for difference in sorted(differences, key=lambda d: (d.tenant_id, d.feature, d.bucket)):
                self.stdout.write(describe(difference))
            found += len(differences)
            try:
                drift = counters.compare_live(root.pk, repair=not dry_run, using=using)
            except counters.RedisError as error:
                self.stderr.write(
                    f"{root.external_id}: Redis unreachable ({type(error).__name__}), counters not compared"
                )
                continue
            if drift:
                names.update(
                    Tenant.objects.filter(pk__in={d.tenant_pk for d in drift}).values_list("pk", "external_id")
                )
            for item in sorted(drift, key=lambda d: d.key):
                self.stdout.write(describe_drift(item, names.get(item.tenant_pk, str(item.tenant_pk))))
            drifted += len(drift)
        verb = "found" if dry_run else "repaired"
        self.stdout.write(f"{found} differences {verb} in {len(roots)} trees")
        self.stdout.write(f"{drifted} live counters {verb} drifting from the rollups")

    def reconcile_lago(self, since: date | None, until: date | None) -> None:
        from metering.delivery.reconcile_lago import LagoUnavailable, reconcile
        from metering.delivery.sinks import SinkNotConfigured, get_sink
        from metering.delivery.sinks.lago import LagoSink

        try:
            sink = get_sink("lago")
            problem = sink.configuration_error() if sink is not None else "no sink"
        except SinkNotConfigured as error:
            raise CommandError(str(error)) from error
        if problem:
            raise CommandError(problem)
        if not isinstance(sink, LagoSink):
            raise CommandError("the configured sink is not Lago")
        try:
            result = reconcile(since, until, sink=sink)
        except LagoUnavailable as error:
            raise CommandError(f"Lago could not be read: {error}") from error
        for day in result.differences:
            head = (
                f"{day.subscription} {day.code} {day.day.isoformat()}: delivered {day.delivered}, Lago holds {day.held}"
            )
            self.stdout.write(head)
            for label, names in (
                ("delivered, not in Lago", day.missing),
                ("in Lago, not delivered by us", day.unexpected),
                ("Lago holds another event under the id", day.differing),
                ("held more than once in Lago (billed twice)", day.duplicated),
                ("accepted, not billable (outside the subscription's boundaries)", day.not_billable),
            ):
                if names:
                    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
                    self.stdout.write(f"  {label}: {len(names)}: {shown}")
        if result.unverifiable:
            self.stdout.write(f"{result.unverifiable} delivered facts without a frozen body were not compared")
        for subscription in result.boundaries_unknown:
            self.stdout.write(f"subscription {subscription}: Lago did not describe it, billability not checked")
        self.stdout.write(
            f"{len(result.differences)} differences in {len(result.days)} subscription x code x days compared"
        )

    def reconcile_sink(self, sink: str) -> None:
        from metering.delivery.reconcile import reconcile_clickhouse
        from metering.delivery.sinks.base import SinkNotConfigured

        try:
            differences = reconcile_clickhouse()
        except SinkNotConfigured as error:  # settings missing, or ClickHouseError: unreachable, refused
            raise CommandError(f"{sink}: {error}") from error
        for d in differences:
            self.stdout.write(
                f"{d.tenant_id} {d.feature} {d.day:%Y-%m-%d}: facts {format_units(d.facts_units)} "
                f"({d.facts_events} events), {sink} {format_units(d.sink_units)} ({d.sink_events} events)"
            )
        self.stdout.write(f"{len(differences)} differences between the facts and {sink}")
        if differences:
            raise SystemExit(1)

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


KINDS = {counters.USED: ("counter", "rollups"), counters.RESERVED: ("reserved counter", "open reservations")}


def describe_drift(drift: counters.CounterDrift, tenant_id: str) -> str:
    window = "all time" if drift.window_start is None else f"{drift.window_start.astimezone(UTC):%Y-%m-%d %H:00} UTC"
    what, source = KINDS.get(drift.kind, (f"{drift.kind} counter", "database"))
    return (
        f"{what} {tenant_id} {drift.feature} {drift.period} from {window}: "
        f"Redis {format_units(drift.stored_units)} -> {source} {format_units(drift.expected_units)}"
    )


def format_units(units: int) -> str:
    quantity: Decimal = units_to_quantity(units)
    # Fixed-point: a normalized Decimal would print 10 as "1E+1".
    return format(quantity, "f")
