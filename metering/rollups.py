"""Hourly rollups: every fact adds its units to (tenant, feature, hour) at *every* level of its lineage.

So a tenant's rollup rows hold its whole subtree's usage, and any window's usage is a sum over at most one row per
hour of one tenant, whatever the size of the subtree or the number of facts. Rows are upserted root first, so two
writers lock shared rows in the same order and never deadlock.

Exact range: a row holds up to 10**38 - 1 units on PostgreSQL (``numeric(38,0)``) and 2**63 - 1 on SQLite; a fact
that would carry a row past it is refused (``UsageTotalOutOfRange``), never stored rounded. Sums over many rows are
exact on both (PostgreSQL sums numerics; on SQLite a sum past 64 bits is redone in Python).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import DataError, OperationalError, connections, transaction
from django.db.models import Count, QuerySet, Sum
from django.db.models.functions import TruncDay, TruncHour
from django.dispatch import receiver

from tenants.locks import lock_trees
from tenants.models import Tenant
from tenants.signals import subtree_moved, subtree_moving

from .exceptions import UsageTotalOutOfRange
from .models import UsageRecord, UsageRollup

RollupKey = tuple[int, str, datetime]  # (tenant pk, feature, hour)
SQLITE_MAX_UNITS = 2**63 - 1  # SQLite integers are 64-bit; past that, + silently yields an inexact REAL


def _table(model: type[Any], using: str) -> str:
    return connections[using].ops.quote_name(model._meta.db_table)


def _upsert_sql(table: str, rows: int, source: str | None = None, *, guarded: bool = False) -> str:
    """``guarded`` (SQLite): a row that would pass 64 bits is left alone, and only updated rows are returned, so the
    caller sees the refusal; PostgreSQL raises ``numeric_value_out_of_range`` by itself."""
    values = source or "VALUES " + ", ".join(["(%s, %s, %s, %s, %s)"] * rows)
    sql = (
        f"INSERT INTO {table} (tenant_id, feature, bucket, units, events) {values} "
        f"ON CONFLICT (tenant_id, feature, bucket) DO UPDATE SET "
        f"units = {table}.units + excluded.units, events = {table}.events + excluded.events"
    )
    if guarded:
        sql += f" WHERE {table}.units <= {SQLITE_MAX_UNITS} - excluded.units RETURNING 1"
    return sql


def out_of_range(error: Exception) -> bool:
    """Whether a database error is PostgreSQL's ``numeric_value_out_of_range`` (a rollup row would overflow)."""
    return isinstance(error, DataError) and getattr(error.__cause__, "sqlstate", None) == "22003"


def refusal(feature: str) -> UsageTotalOutOfRange:
    return UsageTotalOutOfRange(
        f"this fact would carry the hourly total of {feature!r} at a level of its lineage beyond the exact range; "
        "nothing was stored"
    )


def add(
    lineage_pks: Sequence[int],
    feature: str,
    hour: datetime,
    units: int,
    events: int = 1,
    *,
    using: str = "default",
) -> None:
    """Add ``units`` (and ``events``) to the hour's row of every tenant in ``lineage_pks``, root first.

    Raises ``UsageTotalOutOfRange`` when a row would leave the exact range (roll the transaction back)."""
    connection = connections[using]
    guarded = connection.vendor != "postgresql"
    with connection.cursor() as cursor:
        try:
            cursor.execute(*add_statement(lineage_pks, feature, hour, units, events, using=using))
        except DataError as error:
            if out_of_range(error):
                raise refusal(feature) from None
            raise
        if guarded and len(cursor.fetchall()) < len(lineage_pks):
            raise refusal(feature)


def add_statement(
    lineage_pks: Sequence[int], feature: str, hour: datetime, units: int, events: int = 1, *, using: str = "default"
) -> tuple[str, list[Any]]:
    """The SQL of ``add``, to send along with other statements (on PostgreSQL it returns no rows)."""
    connection = connections[using]
    bucket = connection.ops.adapt_datetimefield_value(hour)
    params: list[Any] = []
    for pk in lineage_pks:
        params += [pk, feature, bucket, units, events]
    guarded = connection.vendor != "postgresql"
    return _upsert_sql(_table(UsageRollup, using), len(lineage_pks), guarded=guarded), params


def add_many(rows: Iterable[tuple[int, str, datetime, int, int]], *, using: str = "default", chunk: int = 1000) -> int:
    """Add many facts' units at once: ``rows`` of (tenant pk, feature, hour, units, events), one per fact and level
    (a fact of a 3-level lineage gives 3 rows). They are summed per (tenant, feature, hour) first, so a batch of any
    size upserts each rollup row once (no hot row queued on per fact), in (tenant, feature, hour) order.
    Returns the number of rollup rows upserted. Raises ``UsageTotalOutOfRange`` like ``add``."""
    totals: dict[RollupKey, list[int]] = {}
    for tenant_pk, feature, hour, units, events in rows:
        total = totals.setdefault((tenant_pk, feature, hour), [0, 0])
        total[0] += units
        total[1] += events
    if not totals:
        return 0
    connection = connections[using]
    guarded = connection.vendor != "postgresql"
    table = _table(UsageRollup, using)
    ordered = sorted(totals.items(), key=lambda item: (item[0][0], item[0][1], item[0][2]))
    with connection.cursor() as cursor:
        for start in range(0, len(ordered), chunk):
            part = ordered[start : start + chunk]
            params: list[Any] = []
            for (tenant_pk, feature, hour), (units, events) in part:
                params += [tenant_pk, feature, connection.ops.adapt_datetimefield_value(hour), units, events]
            try:
                cursor.execute(_upsert_sql(table, len(part), guarded=guarded), params)
            except DataError as error:
                if out_of_range(error):
                    raise refusal(part[0][0][1]) from None
                raise
            if guarded and len(cursor.fetchall()) < len(part):
                raise refusal(part[0][0][1])
    return len(ordered)


def add_for_inserted(
    source: str, lineage_pks: Sequence[int], feature: str, hour: datetime, units: int, *, using: str = "default"
) -> tuple[str, list[Any]]:
    """``add`` as one statement that counts only if ``source`` (a CTE inserting the fact) returned its row.

    PostgreSQL only (a data-modifying CTE). Rows are upserted root first, like ``add``.
    """
    connection = connections[using]
    table = _table(UsageRollup, using)
    levels = ", ".join(["(%s, %s)"] * len(lineage_pks))
    sql = _upsert_sql(
        table,
        0,
        f"SELECT level.tenant_id, %s, %s, %s, 1 FROM {source} "  # noqa: S608 (our names; values are parameters)
        f"CROSS JOIN (VALUES {levels}) AS level(position, tenant_id) ORDER BY level.position",
    )
    params: list[Any] = [feature, connection.ops.adapt_datetimefield_value(hour), units]
    for position, pk in enumerate(lineage_pks):
        params += [position, pk]
    return sql, params


def sum_units(
    tenant_pk: int,
    feature: str,
    start: datetime | None,
    end: datetime | None,
    *,
    using: str = "default",
) -> int:
    """Units of the tenant's subtree in whole hours ``[start, end)`` (``None``: unbounded)."""
    rows = UsageRollup.objects.using(using).filter(tenant_id=tenant_pk, feature=feature)
    if start is not None:
        rows = rows.filter(bucket__gte=start)
    if end is not None:
        rows = rows.filter(bucket__lt=end)
    return exact_sum(rows)


def exact_sum(rows: QuerySet[Any], field: str = "units") -> int:
    """``SUM(field)`` of ``rows`` as an exact ``int``. SQLite refuses a sum past 64 bits ("integer overflow"): then
    the rows are summed in Python, exactly (PostgreSQL sums bigints and numerics as exact numerics)."""
    try:
        return int(rows.aggregate(total=Sum(field))["total"] or 0)
    except OperationalError as error:
        if "integer overflow" not in str(error):
            raise
        return sum(int(value) for value in rows.values_list(field, flat=True).iterator())


def sum_units_from_facts(
    tenant_path: str, feature: str, start: datetime, end: datetime, *, using: str = "default"
) -> int:
    """Units of the subtree's raw facts in ``[start, end)``; used only for the partial hours at a range's edges."""
    facts = UsageRecord.objects.using(using).filter(
        tenant__path__startswith=tenant_path, feature=feature, timestamp__gte=start, timestamp__lt=end
    )
    return exact_sum(facts)


@receiver(subtree_moving, dispatch_uid="xaas_metering_drain_before_move")
def drain_before_move(sender: type[Tenant], tenant: Tenant, root_pks: set[int], **kwargs: Any) -> None:
    """Log mode: persist the trees' streams before the paths change (``metering.drain.drain_for_move``): their
    undrained facts are then rolled up by the lineage they were admitted under, and moved with the rollups below."""
    from . import log

    if log.is_log_mode():
        from .drain import drain_for_move

        drain_for_move(root_pks, using=kwargs.get("using", "default"))


@receiver(subtree_moved, dispatch_uid="xaas_metering_move_rollups")
def move_rollups(
    sender: type[Tenant],
    tenant: Tenant,
    old_ancestor_pks: list[int],
    new_ancestor_pks: list[int],
    root_pks: set[int],
    **kwargs: Any,
) -> None:
    """Carry a moved subtree's usage from its old ancestors to its new ones (both trees are locked)."""
    from . import counters

    using = kwargs.get("using", "default")
    table = _table(UsageRollup, using)
    leaving = [pk for pk in old_ancestor_pks if pk not in new_ancestor_pks]
    joining = [pk for pk in new_ancestor_pks if pk not in old_ancestor_pks]
    guarded = connections[using].vendor != "postgresql"
    with connections[using].cursor() as cursor:
        moved_rows = UsageRollup.objects.using(using).filter(tenant_id=tenant.pk).count() if guarded else 0
        for sign, ancestors in ((-1, leaving), (1, joining)):
            for ancestor in ancestors:
                source = (
                    f"SELECT %s, feature, bucket, {sign} * units, {sign} * events "  # noqa: S608 (our table)
                    f"FROM {table} WHERE tenant_id = %s"
                )
                # SQLite: a joined ancestor's row must not pass 64 bits (the move is refused, all of it).
                cursor.execute(_upsert_sql(table, 0, source, guarded=guarded and sign > 0), [ancestor, tenant.pk])
                if guarded and sign > 0 and len(cursor.fetchall()) < moved_rows:
                    raise UsageTotalOutOfRange(
                        f"moving {tenant.external_id!r} would carry an hourly total of its new ancestors beyond the "
                        "exact range; nothing was moved"
                    )
        if leaving:
            UsageRollup.objects.using(using).filter(tenant_id__in=leaving, units=0, events=0).delete()
    # In the move's transaction: from its commit on, both trees' counters are rebuilt before any decision.
    counters.bump_epochs(root_pks, using)


@dataclass(frozen=True, slots=True)
class RollupDifference:
    tenant_id: str
    feature: str
    bucket: datetime
    stored_units: int
    expected_units: int
    stored_events: int
    expected_events: int


def reconcile_tree(root: Tenant, *, repair: bool, using: str = "default") -> list[RollupDifference]:
    """Recompute the rollups of ``root``'s tree from its facts; with ``repair``, fix every difference.

    Works one UTC day at a time, each day in its own transaction under the tree's exclusive lock (no writer is
    half-way through): memory and the time writers wait are bounded by one day of the tree, not its history.
    Call it outside ``atomic()``, or the lock is held until the caller's transaction ends.
    """
    tenants = {pk: (path, ext) for pk, path, ext in _tree_tenants(root, using)}
    differences: list[RollupDifference] = []
    for day in _days_with_data(root, tenants, using):
        with transaction.atomic(using=using):
            lock_trees([root.pk], exclusive=True, using=using)
            found = _reconcile_window(root, tenants, day, day + timedelta(days=1), repair, using)
            if repair and found:
                # Counters built from the old rows must not outlive them: retired with this day's repair.
                from . import counters

                counters.bump_epochs([root.pk], using)
        differences += found
    return differences


def _days_with_data(root: Tenant, tenants: dict[int, tuple[str, str]], using: str) -> list[datetime]:
    """The UTC days holding a fact or a rollup row of the tree (a stray row is a difference too)."""
    fact_days = (
        UsageRecord.objects.using(using)
        .filter(tenant__path__startswith=root.path)
        .annotate(day=TruncDay("timestamp", tzinfo=UTC))
        .values_list("day", flat=True)
        .distinct()
        .order_by()
    )
    rollup_days = (
        UsageRollup.objects.using(using)
        .filter(tenant_id__in=tenants)
        .annotate(day=TruncDay("bucket", tzinfo=UTC))
        .values_list("day", flat=True)
        .distinct()
        .order_by()
    )
    return sorted(set(fact_days) | set(rollup_days))


def _reconcile_window(
    root: Tenant, tenants: dict[int, tuple[str, str]], start: datetime, end: datetime, repair: bool, using: str
) -> list[RollupDifference]:
    expected: dict[RollupKey, list[int]] = defaultdict(lambda: [0, 0])
    own = (
        UsageRecord.objects.using(using)
        .filter(tenant__path__startswith=root.path, timestamp__gte=start, timestamp__lt=end)
        .annotate(hour=TruncHour("timestamp", tzinfo=UTC))  # buckets are UTC hours, whatever TIME_ZONE is
        .values_list("tenant_id", "feature", "hour")
        .annotate(units=Sum("units"), events=Count("id"))
        .order_by()
    )
    for tenant_pk, feature, hour, units, events in own:
        path = tenants[tenant_pk][0]
        for ancestor in (int(part) for part in path.strip("/").split("/")):
            totals = expected[(ancestor, feature, hour)]
            totals[0] += units
            totals[1] += events
    stored = {
        (tenant_pk, feature, bucket): (units, events)
        for tenant_pk, feature, bucket, units, events in UsageRollup.objects.using(using)
        .filter(tenant_id__in=tenants, bucket__gte=start, bucket__lt=end)
        .values_list("tenant_id", "feature", "bucket", "units", "events")
    }
    differences = [
        RollupDifference(
            tenants[key[0]][1],
            key[1],
            key[2],
            stored.get(key, (0, 0))[0],
            want[0],
            stored.get(key, (0, 0))[1],
            want[1],
        )
        for key, want in expected.items()
        if tuple(want) != stored.get(key, (0, 0))
    ] + [
        RollupDifference(tenants[key[0]][1], key[1], key[2], have[0], 0, have[1], 0)
        for key, have in stored.items()
        if key not in expected and have != (0, 0)
    ]
    if repair and differences:
        _rewrite(expected, stored, using)
    return differences


def _tree_tenants(root: Tenant, using: str) -> Iterable[tuple[int, str, str]]:
    return Tenant.objects.using(using).filter(path__startswith=root.path).values_list("pk", "path", "external_id")


def _rewrite(expected: dict[RollupKey, list[int]], stored: dict[RollupKey, tuple[int, int]], using: str) -> None:
    for tenant_pk, feature, bucket in (key for key in stored if key not in expected):
        UsageRollup.objects.using(using).filter(tenant_id=tenant_pk, feature=feature, bucket=bucket).delete()
    changed = [
        UsageRollup(tenant_id=key[0], feature=key[1], bucket=key[2], units=want[0], events=want[1])
        for key, want in expected.items()
        if tuple(want) != stored.get(key)
    ]
    UsageRollup.objects.using(using).bulk_create(
        changed,
        batch_size=1000,
        update_conflicts=True,
        unique_fields=["tenant", "feature", "bucket"],
        update_fields=["units", "events"],
    )
