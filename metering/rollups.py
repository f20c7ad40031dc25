"""Hourly rollups: every fact adds its units to (tenant, feature, hour) at *every* level of its lineage.

So a tenant's rollup rows hold its whole subtree's usage, and any window's usage is a sum over a few rows per hour
of one tenant, whatever the size of the subtree or the number of facts. Rows are upserted root first, so two
writers lock shared rows in the same order and never deadlock.

Slots (no hot row). One (tenant, feature, hour) is the sum of up to ``SLOT_ROWS`` rows (``UsageRollup.slot``). On
PostgreSQL a transaction adds to slot ``1 + xid % METERING["ROLLUP_SLOTS"]`` (its transaction id: one slot for the
whole transaction, so its rows are still locked root first; consecutive transactions take different slots), so
concurrent writers of one tree no longer queue on their organization's row. ``fold`` (the ``metering.fold_rollups``
beat task, ``manage.py fold_rollups``) merges the slots of hours that are over into slot 0, so reading history
stays one row per hour. SQLite serializes writers anyway: there every row is slot 0.

Exact range. The bound is on the *sum* of an hour's slots, the number a reader sees: 10**38 - 1 units on PostgreSQL
(``numeric(38,0)``, as when an hour was one row) and 2**63 - 1 on SQLite (one slot). On PostgreSQL a writer's slot
row holds at most ``SLOT_UNITS`` (10**36 - 1) and slot 0 at most ``BASE_UNITS`` (10**36 + 98), and there are at
most 100 slots, so the sum can never pass 10**38 - 1, whichever slots concurrent writers fill: nothing reads the
other slots, so no race can carry a sum past it. The price: a fact whose slot row would pass its bound is refused
(``UsageTotalOutOfRange``, nothing stored) although the hour's sum might have room; any hour whose sum is below
10**36 - 1 units (10**30 of a unit) refuses nothing. A fact is never stored rounded. Sums over many rows are exact
on both (PostgreSQL sums numerics; on SQLite a sum past 64 bits is redone in Python).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import DataError, IntegrityError, OperationalError, connections, transaction
from django.db.models import Count, QuerySet, Sum
from django.db.models.functions import TruncDay, TruncHour
from django.dispatch import receiver

from tenants.locks import lock_name, lock_trees
from tenants.models import Tenant
from tenants.signals import subtree_moved, subtree_moving

from .conf import metering_settings
from .exceptions import UsageTotalOutOfRange
from .models import UsageRecord, UsageRollup

RollupKey = tuple[int, str, datetime]  # (tenant pk, feature, hour)
SQLITE_MAX_UNITS = 2**63 - 1  # SQLite integers are 64-bit; past that, + silently yields an inexact REAL
SLOT_ROWS = 100  # slots 0 .. 99 of one (tenant, feature, hour); the model's check constraint holds the same bound
POSTGRES_MAX_UNITS = 10**38 - 1  # the sum of an hour's slots: numeric(38,0), what one row held before slots
SLOT_DIGITS = 36
SLOT_UNITS = 10**SLOT_DIGITS - 1  # a writer's slot row (1 .. 99) on PostgreSQL: past it, numeric(36,0) refuses
BASE_UNITS = POSTGRES_MAX_UNITS - (SLOT_ROWS - 1) * SLOT_UNITS  # slot 0 on PostgreSQL: 10**36 + 98
MAX_WRITER_SLOTS = SLOT_ROWS - 1


def _table(model: type[Any], using: str) -> str:
    return connections[using].ops.quote_name(model._meta.db_table)


def writer_slots() -> int:
    """``METERING["ROLLUP_SLOTS"]``: how many slots PostgreSQL writers spread over (1 to 99; check E036)."""
    value = metering_settings.ROLLUP_SLOTS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WRITER_SLOTS:
        raise ImproperlyConfigured(f"METERING['ROLLUP_SLOTS'] must be an integer from 1 to {MAX_WRITER_SLOTS}")
    return value


def _slot_sql(using: str) -> str:
    """The slot a writer adds to, as SQL: on PostgreSQL from the transaction's id (the same for every statement of
    the transaction, so its rows keep their root-first lock order), never 0 (slot 0 is ``fold``'s); SQLite: 0."""
    if connections[using].vendor != "postgresql":
        return "0"
    return f"(1 + mod(pg_current_xact_id()::text::bigint, {writer_slots()}))"


def _upsert_sql(table: str, rows: int, source: str | None = None, *, guarded: bool = False, slot: str = "0") -> str:
    """Add rows to their slot: ``rows`` VALUES tuples of (tenant_id, feature, bucket, units, events) parameters, in
    slot ``slot`` (SQL, ``_slot_sql``); or the rows of ``source``, a query yielding (tenant_id, feature, bucket,
    slot, units, events) in the order they are to be locked.

    ``guarded`` (SQLite): a row that would pass 64 bits is left alone, and only updated rows are returned, so the
    caller sees the refusal. PostgreSQL: a slot row that would pass ``SLOT_UNITS`` raises
    ``numeric_value_out_of_range`` (the ``numeric(36,0)`` cast; ``out_of_range`` names it) and nothing is written."""
    values = source or "VALUES " + ", ".join([f"(%s, %s, %s, {slot}, {_bounded('%s', guarded)}, %s)"] * rows)
    sql = (
        f"INSERT INTO {table} (tenant_id, feature, bucket, slot, units, events) {values} "
        f"ON CONFLICT (tenant_id, feature, bucket, slot) DO UPDATE SET "
        f"units = {_bounded(f'{table}.units + excluded.units', guarded)}, events = {table}.events + excluded.events"
    )
    if guarded:
        sql += f" WHERE {table}.units <= {SQLITE_MAX_UNITS} - excluded.units RETURNING 1"
    return sql


def _bounded(expression: str, guarded: bool) -> str:
    """PostgreSQL: ``expression`` as a writer's slot row may hold it (raises 22003 beyond ``SLOT_UNITS``)."""
    return expression if guarded else f"CAST({expression} AS numeric({SLOT_DIGITS},0))"


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
    return _upsert_sql(_table(UsageRollup, using), len(lineage_pks), guarded=guarded, slot=_slot_sql(using)), params


def add_many(rows: Iterable[tuple[int, str, datetime, int, int]], *, using: str = "default", chunk: int = 1000) -> int:
    """Add many facts' units at once: ``rows`` of (tenant pk, feature, hour, units, events), one per fact and level
    (a fact of a 3-level lineage gives 3 rows). They are summed per (tenant, feature, hour) first, so a batch of any
    size upserts each rollup row once (no hot row queued on per fact), in (tenant, feature, hour) order, all in the
    transaction's one slot. Returns the number of rollup rows upserted. Raises ``UsageTotalOutOfRange`` like
    ``add`` (on PostgreSQL: when the batch's sum for a slot row would pass ``SLOT_UNITS``)."""
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
    slot = _slot_sql(using)
    ordered = sorted(totals.items(), key=lambda item: (item[0][0], item[0][1], item[0][2]))
    if guarded:
        # A batch's own sum past 64 bits cannot even be sent to SQLite (the driver raises OverflowError).
        for (_, feature, _), (units, _) in ordered:
            if units > SQLITE_MAX_UNITS:
                raise refusal(feature)
    with connection.cursor() as cursor:
        for start in range(0, len(ordered), chunk):
            part = ordered[start : start + chunk]
            params: list[Any] = []
            for (tenant_pk, feature, hour), (units, events) in part:
                params += [tenant_pk, feature, connection.ops.adapt_datetimefield_value(hour), units, events]
            try:
                cursor.execute(_upsert_sql(table, len(part), guarded=guarded, slot=slot), params)
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
    bounded = _bounded("%s::numeric", guarded=False)
    sql = _upsert_sql(
        table,
        0,
        f"SELECT level.tenant_id, %s, %s, {_slot_sql(using)}, {bounded}, 1 FROM {source} "  # noqa: S608 (our names)
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


def pack(units: int, events: int, vendor: str) -> list[tuple[int, int, int]]:
    """An hour's total as the fewest slot rows (slot, units, events) within their bounds: slot 0 first, the events
    on it. Raises ``UsageTotalOutOfRange`` past the exact range (``fold`` never gets there; ``reconcile`` may)."""
    if vendor != "postgresql":
        if units > SQLITE_MAX_UNITS:
            raise UsageTotalOutOfRange("an hourly total would pass the exact range (2**63 - 1 units on SQLite)")
        return [(0, units, events)]
    if units > POSTGRES_MAX_UNITS:
        raise UsageTotalOutOfRange("an hourly total would pass the exact range (10**38 - 1 units)")
    rows = [(0, min(units, BASE_UNITS), events)]
    rest, slot = units - rows[0][1], 1
    while rest > 0:
        rows.append((slot, min(rest, SLOT_UNITS), 0))
        rest -= rows[-1][1]
        slot += 1
    return rows


# The leaving/joining ancestors' hours the moved subtree has, re-packed from their old sum +/- the moved one's (so
# rows never go negative and a slot row never passes its bound; the constraint refuses more than SLOT_ROWS slots).
_MOVE_SQL = """
WITH moved AS (
    SELECT feature, bucket, sum(units) AS units, sum(events) AS events FROM {table} WHERE tenant_id = %(moved)s
    GROUP BY feature, bucket
), gone AS (
    DELETE FROM {table} AS r USING moved
    WHERE r.tenant_id = %(ancestor)s AND r.feature = moved.feature AND r.bucket = moved.bucket
    RETURNING r.feature, r.bucket, r.units, r.events
), had AS (
    SELECT feature, bucket, sum(units) AS units, sum(events) AS events FROM gone GROUP BY feature, bucket
), total AS (
    SELECT m.feature, m.bucket, coalesce(h.units, 0) + %(sign)s * m.units AS units,
           coalesce(h.events, 0) + %(sign)s * m.events AS events
    FROM moved AS m LEFT JOIN had AS h ON h.feature = m.feature AND h.bucket = m.bucket
)
INSERT INTO {table} (tenant_id, feature, bucket, slot, units, events)
SELECT %(ancestor)s, total.feature, total.bucket, part.slot, part.units,
       CASE WHEN part.slot = 0 THEN total.events ELSE 0 END
FROM total CROSS JOIN LATERAL (
    SELECT 0 AS slot, least(total.units, %(base)s) AS units
    UNION ALL
    SELECT i, least(total.units - %(base)s - (i - 1) * %(slot_units)s::numeric, %(slot_units)s)
    FROM generate_series(1, ceil(greatest(total.units - %(base)s, 0) / %(slot_units)s::numeric)::int) AS i
) AS part
WHERE total.units <> 0 OR total.events <> 0
"""


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
    """Carry a moved subtree's usage from its old ancestors to its new ones (both trees are locked exclusively, so
    no writer and no ``fold`` is in flight on their rows)."""
    from . import counters

    using = kwargs.get("using", "default")
    table = _table(UsageRollup, using)
    leaving = [pk for pk in old_ancestor_pks if pk not in new_ancestor_pks]
    joining = [pk for pk in new_ancestor_pks if pk not in old_ancestor_pks]
    refused = UsageTotalOutOfRange(
        f"moving {tenant.external_id!r} would carry an hourly total of its new ancestors beyond the exact range; "
        "nothing was moved"
    )
    if connections[using].vendor == "postgresql":
        with connections[using].cursor() as cursor:
            for sign, ancestors in ((-1, leaving), (1, joining)):
                for ancestor in ancestors:
                    params = {
                        "moved": tenant.pk,
                        "ancestor": ancestor,
                        "sign": sign,
                        "base": BASE_UNITS,
                        "slot_units": SLOT_UNITS,
                    }
                    try:
                        cursor.execute(_MOVE_SQL.format(table=table), params)
                    except IntegrityError as error:  # more than SLOT_ROWS slots: past 10**38 - 1 units
                        if getattr(error.__cause__, "sqlstate", None) == "23514":
                            raise refused from None
                        raise
    else:
        _move_single_slot(tenant, leaving, joining, table, refused, using)
    # In the move's transaction: from its commit on, both trees' counters are rebuilt before any decision.
    counters.bump_epochs(root_pks, using)


def _move_single_slot(
    tenant: Tenant, leaving: list[int], joining: list[int], table: str, refused: Exception, using: str
) -> None:
    """SQLite: every row is slot 0, so the moved rows are added to (subtracted from) the ancestors' rows as they are;
    a joined ancestor's row that would pass 64 bits refuses the whole move."""
    with connections[using].cursor() as cursor:
        moved_rows = UsageRollup.objects.using(using).filter(tenant_id=tenant.pk).count()
        for sign, ancestors in ((-1, leaving), (1, joining)):
            for ancestor in ancestors:
                source = (
                    f"SELECT %s, feature, bucket, slot, {sign} * units, {sign} * events "  # noqa: S608 (our table)
                    f"FROM {table} WHERE tenant_id = %s"
                )
                cursor.execute(_upsert_sql(table, 0, source, guarded=sign > 0), [ancestor, tenant.pk])
                if sign > 0 and len(cursor.fetchall()) < moved_rows:
                    raise refused
        if leaving:
            UsageRollup.objects.using(using).filter(tenant_id__in=leaving, units=0, events=0).delete()


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
    stored: dict[RollupKey, tuple[int, int]] = {}
    for tenant_pk, feature, bucket, units, events in (
        UsageRollup.objects.using(using)
        .filter(tenant_id__in=tenants, bucket__gte=start, bucket__lt=end)
        .values_list("tenant_id", "feature", "bucket", "units", "events")
    ):
        have = stored.get((tenant_pk, feature, bucket), (0, 0))  # an hour is the sum of its slots
        stored[(tenant_pk, feature, bucket)] = (have[0] + units, have[1] + events)
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
    """Every hour that differs gets its rows replaced by the expected total, packed (``pack``). Under the tree's
    exclusive lock: no writer and no ``fold`` is touching these rows."""
    vendor = connections[using].vendor
    changed = [key for key, want in expected.items() if tuple(want) != stored.get(key)]
    stray = [key for key in stored if key not in expected]
    rows = UsageRollup.objects.using(using)
    for tenant_pk, feature, bucket in stray + changed:
        rows.filter(tenant_id=tenant_pk, feature=feature, bucket=bucket).delete()
    packed = [
        UsageRollup(tenant_id=key[0], feature=key[1], bucket=key[2], slot=slot, units=units, events=events)
        for key in changed
        for slot, units, events in pack(expected[key][0], expected[key][1], vendor)
    ]
    rows.bulk_create(packed, batch_size=1000)


# ---- folding: an hour that is over becomes one row again ----


@dataclass(frozen=True, slots=True)
class FoldReport:
    trees: int
    rows_folded: int  # slot rows merged into slot 0 (and deleted)
    rows_left: int  # slot rows left as they were: held by a writer at that moment, or slot 0 would pass its bound


def fold(
    before: datetime | None = None, *, roots: Iterable[int] | None = None, using: str = "default", chunk: int = 5000
) -> FoldReport:
    """Merge the writer slots (1..99) of every hour before ``before`` (default: the current UTC hour) into slot 0,
    in every tree (or the trees rooted at ``roots``).

    Exact beside concurrent writers, and idempotent: per tree, one transaction at a time holding the tree's lock
    *shared* (as a writer does: a reconcile or a move, which hold it exclusively, never run beside it) and a named
    lock (one fold of a tree at a time). Slot rows are locked ``FOR UPDATE SKIP LOCKED``: a row a writer is adding
    to is left for the next fold (so the fold never waits on a writer, nor a writer on it for long: a writer adding
    to a row the fold deleted inserts it again). Slot 0 is written only by folds, reconciles and moves on
    PostgreSQL, so it is never a writer's row. Sums never change: each slot row's units and events move to slot 0
    of the same hour in one transaction. A slot 0 that would pass ``BASE_UNITS`` is left split (reads stay exact).
    """
    from .windows import floor_hour

    if before is None:
        before = floor_hour(datetime.now(UTC))
    rows = UsageRollup.objects.using(using).filter(slot__gt=0, bucket__lt=before)
    tenant_pks = set(rows.values_list("tenant_id", flat=True).distinct().order_by())
    by_root: dict[int, list[int]] = defaultdict(list)
    for pk, path in Tenant.objects.using(using).filter(pk__in=tenant_pks).values_list("pk", "path"):
        by_root[int(path.strip("/").split("/")[0])].append(pk)
    if roots is not None:
        wanted = set(roots)
        by_root = defaultdict(list, {root: pks for root, pks in by_root.items() if root in wanted})
    folded = left = 0
    for root_pk in sorted(by_root):
        tree_folded, tree_left = _fold_tree(root_pk, by_root[root_pk], before, using, chunk)
        folded += tree_folded
        left += tree_left
    return FoldReport(trees=len(by_root), rows_folded=folded, rows_left=left)


def _fold_tree(root_pk: int, tenant_pks: list[int], before: datetime, using: str, chunk: int) -> tuple[int, int]:
    """(rows folded, rows left split) of one tree, ``chunk`` slot rows per transaction."""
    folded, left = 0, list[int]()
    while True:
        with transaction.atomic(using=using):
            lock_trees([root_pk], exclusive=False, using=using)
            lock_name(f"rollup-fold:{root_pk}", using=using)
            if connections[using].vendor == "postgresql":
                locked, done, kept = _fold_chunk_postgresql(tenant_pks, before, left, using, chunk)
            else:
                locked, done, kept = _fold_chunk(tenant_pks, before, left, using, chunk)
        folded += done
        left += kept
        if locked < chunk:
            return folded, len(left)


# One chunk of one tree in one statement: lock slot rows (skipping those a writer holds), add each hour's sum to its
# slot 0 unless that would pass BASE_UNITS, delete the rows added. Slot 0 is read without a lock: only folds (one
# per tree at a time, the named lock) write it while the tree is locked shared.
_FOLD_SQL = """
WITH locked AS (
    SELECT id, tenant_id, feature, bucket, units, events FROM {table}
    WHERE tenant_id = ANY(%(tenants)s) AND slot > 0 AND bucket < %(before)s AND id <> ALL(%(left)s)
    ORDER BY tenant_id, feature, bucket, slot LIMIT %(chunk)s FOR UPDATE SKIP LOCKED
), sums AS (
    SELECT tenant_id, feature, bucket, sum(units) AS units, sum(events) AS events, array_agg(id) AS ids
    FROM locked GROUP BY tenant_id, feature, bucket
), fits AS (
    SELECT sums.* FROM sums LEFT JOIN {table} AS base
    ON base.tenant_id = sums.tenant_id AND base.feature = sums.feature AND base.bucket = sums.bucket AND base.slot = 0
    WHERE coalesce(base.units, 0) + sums.units <= %(bound)s
), added AS (
    INSERT INTO {table} (tenant_id, feature, bucket, slot, units, events)
    SELECT tenant_id, feature, bucket, 0, units, events FROM fits ORDER BY tenant_id, feature, bucket
    ON CONFLICT (tenant_id, feature, bucket, slot) DO UPDATE
    SET units = {table}.units + excluded.units, events = {table}.events + excluded.events
    RETURNING 1
), gone AS (
    DELETE FROM {table} WHERE id IN (SELECT unnest(ids) FROM fits) RETURNING id
)
SELECT (SELECT count(*) FROM locked), (SELECT count(*) FROM gone), (SELECT count(*) FROM added),
       (SELECT coalesce(array_agg(id), '{{}}') FROM locked WHERE id NOT IN (SELECT id FROM gone))
"""


def _fold_chunk_postgresql(
    tenant_pks: list[int], before: datetime, left: list[int], using: str, chunk: int
) -> tuple[int, int, list[int]]:
    """(rows locked, rows folded, ids left split: their hour's slot 0 would pass ``BASE_UNITS``)."""
    connection = connections[using]
    params = {
        "tenants": tenant_pks,
        "before": connection.ops.adapt_datetimefield_value(before),
        "left": left,
        "chunk": chunk,
        "bound": BASE_UNITS,
    }
    with connection.cursor() as cursor:
        cursor.execute(_FOLD_SQL.format(table=_table(UsageRollup, using)), params)
        locked, gone, _, kept = cursor.fetchone()
    return int(locked), int(gone), list(kept)


def _fold_chunk(
    tenant_pks: list[int], before: datetime, left: list[int], using: str, chunk: int
) -> tuple[int, int, list[int]]:
    """The same with the ORM (SQLite, where writers serialize and only a restored or hand-made row has a slot)."""
    rows = UsageRollup.objects.using(using)
    locked = list(
        rows.filter(tenant_id__in=tenant_pks, slot__gt=0, bucket__lt=before)
        .exclude(pk__in=left)
        .order_by("tenant_id", "feature", "bucket", "slot")
        .values_list("pk", "tenant_id", "feature", "bucket", "units", "events")[:chunk]
    )
    merged: dict[RollupKey, list[Any]] = {}
    for pk, tenant_pk, feature, bucket, units, events in locked:
        entry = merged.setdefault((tenant_pk, feature, bucket), [0, 0, []])
        entry[0] += units
        entry[1] += events
        entry[2].append(pk)
    gone, kept = [], []
    for (tenant_pk, feature, bucket), (units, events, pks) in sorted(merged.items(), key=lambda item: item[0]):
        base = rows.filter(tenant_id=tenant_pk, feature=feature, bucket=bucket, slot=0).first()
        if (base.units if base else 0) + units > SQLITE_MAX_UNITS:
            kept += pks
        elif base is None:
            rows.create(tenant_id=tenant_pk, feature=feature, bucket=bucket, slot=0, units=units, events=events)
            gone += pks
        else:
            rows.filter(pk=base.pk).update(units=base.units + units, events=base.events + events)
            gone += pks
    for start in range(0, len(gone), 1000):
        rows.filter(pk__in=gone[start : start + 1000]).delete()
    return len(locked), len(gone), kept
