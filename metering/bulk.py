"""Where a *batch* of facts is written: ``record_many`` (commit mode), and ``insert_facts``, the one multi-row insert
that every batch writer uses (this module, the log drainer ``metering.drain``, ``manage.py usage_import``).

``record_many(events)``:

1. validates every event first (``metering.events``'s validators, every field of every event) and resolves each
   tenant's lineage; any problem raises ``InvalidBatch`` carrying ``{index: {field: [message, ...]}}`` and nothing
   is written (all or nothing, as ``POST /api/v1/events``);
2. then, in ONE transaction (a savepoint inside a caller's):
   - admits the batch's features (``recorder.features_admitted``: ``MAX_FEATURES_PER_TREE``), locks the batch's
     trees *shared* (writers of one tree run side by side; a move waits), and re-checks each tenant's path under
     that lock (a move committed since the lineage was cached: the lineages are re-read and the batch redone);
   - inserts the facts with one multi-row statement (PostgreSQL: ``COPY`` into a temporary staging table and one
     ``INSERT ... SELECT ... ON CONFLICT (tenant_id, transaction_id) DO NOTHING RETURNING``). A transaction id the
     tenant already has — in the database, or at a lower index of the same batch — is a *duplicate*: reported per
     index (``BulkResult.duplicates``), never an error, counted once;
   - adds the inserted facts to the hourly rollups of every level, summed per tenant x feature x hour first
     (``rollups.add_many``: one upsert per rollup row per batch, not one per fact);
   - writes the sinks' outbox rows (the adapter's ``on_stored_many``, else ``on_stored`` per fact);
   - adds the facts to the live Redis counters: summed per counter key, one Lua call per tree
     (``lua/increment_many.lua``), all trees in one pipelined round trip, right before ``COMMIT``; should the
     commit then fail, the trees' counters are retired (``counters.DropIfCommitFails``);
3. after the commit, ``usage_recorded`` is sent once per inserted fact (robust, as for a single fact).

A deadlock or serialization failure with another writer redoes the batch (up to ``MAX_ATTEMPTS``), unless it runs
inside a caller's transaction. Batches are not quota-enforced (usage that already happened, like the events API).

In log mode (``METERING["WRITE_MODE"] = "log"``) ``record_many`` validates the same way and then appends each fact
to its tree's Redis stream (``metering.appender``): the facts reach the database through the drainer, whose batch
insert is ``insert_facts`` too. Each tree's facts of the batch go in ONE Lua call (``lua/log_append_many.lua``):
all of them are appended or none; the trees of a batch are written one after the other, so a Redis failure at a
later tree leaves the earlier trees' facts appended (``LogStoreUnavailable``; re-sending the batch is safe: those
come back as duplicates). ``created`` then maps indexes to 0 (a fact has no id before the drainer persists it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import DataError, OperationalError, connections, transaction

from tenants.context import TenantContext
from tenants.exceptions import TenantError
from tenants.lineage import get_context, validate_tenant_id
from tenants.locks import lock_trees
from tenants.models import Tenant

from . import counters, log, rollups, scripts
from .breaker import log_level
from .conf import metering_settings
from .events import (
    UsageEvent,
    ValidEvent,
    quantity_to_units,
    utcnow,
    validate_metadata,
    validate_recorded_feature,
    validate_timestamp,
    validate_transaction_id,
)
from .exceptions import InvalidBatch, InvalidUsageEvent, Problems, TooManyFeatures
from .models import UsageRecord
from .signals import usage_recorded
from .windows import floor_hour

logger = logging.getLogger("metering.bulk")

STAGING = "xaas_drain_staging"  # PostgreSQL: the temporary table a batch's facts are COPYed into
INSERT_CHUNK = 2000  # rows per INSERT elsewhere (7 parameters each: under SQLite's 32,766)
MAX_ATTEMPTS = 3
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock detected, serialization failure
STALE_RETRIES = 3


@dataclass(frozen=True, slots=True)
class StoredFact:
    """A fact a batch inserted (``on_stored_many`` receives them inside the batch's transaction). ``entry`` holds
    the fact's fields (``entry.entry_id`` is its stream id in log mode, ``""`` for a fact written by
    ``record_many``)."""

    record_id: int
    tenant_pk: int
    lineage_pks: tuple[int, ...]
    entry: log.Entry


@dataclass(frozen=True)
class BulkResult:
    """What ``record_many`` did, by index of the batch: ``created`` {index: new fact id}, ``duplicates`` the
    indexes whose transaction id the tenant already had (in the database, or at a lower index of the batch)."""

    created: dict[int, int] = field(default_factory=dict)
    duplicates: tuple[int, ...] = ()

    @property
    def created_count(self) -> int:
        return len(self.created)


@dataclass(frozen=True, slots=True)
class _Item:
    index: int
    valid: ValidEvent
    context: TenantContext


# ---- validation ----


def validate_many(
    events: Sequence[UsageEvent],
    contexts: Sequence[TenantContext | None] | None = None,
    *,
    now: datetime | None = None,
    lineages: dict[str, TenantContext] | None = None,
) -> list[_Item]:
    """Every event checked (every field), each tenant's lineage resolved; ``InvalidBatch`` if any is bad.

    ``lineages``: a cache of resolved lineages the caller keeps across batches (an import): safe, the write
    re-checks every tenant's path under its tree's lock."""
    problems: dict[int, Problems] = {}
    found: dict[str, TenantContext | TenantError] = dict(lineages or {})
    items: list[_Item] = []
    now = now or utcnow()
    for index, event in enumerate(events):
        given = contexts[index] if contexts is not None else None
        valid, context, problem = _validate(event, given, found, now)
        if problem:
            problems[index] = problem
        elif valid is not None and context is not None:
            items.append(_Item(index, valid, context))
            if lineages is not None:
                lineages[context.tenant_id] = context
    if problems:
        raise InvalidBatch(problems, len(events))
    return items


def _validate(
    event: object, given: TenantContext | None, found: dict[str, TenantContext | TenantError], now: datetime
) -> tuple[ValidEvent | None, TenantContext | None, Problems]:
    problems: Problems = {}
    if not isinstance(event, UsageEvent):
        return None, None, {"event": [("invalid", f"expected a UsageEvent, got {type(event).__name__}")]}

    def check(name: str, run: Callable[[], Any]) -> Any:
        try:
            return run()
        except (InvalidUsageEvent, TenantError) as error:
            problems.setdefault(error.field or name, []).append((error.code, str(error)))
            return None

    tenant_id = check("tenant_id", lambda: validate_tenant_id(event.tenant_id))
    feature = check("feature_name", lambda: validate_recorded_feature(event.feature_name))
    units = check("quantity", lambda: quantity_to_units(event.quantity))
    timestamp = check("timestamp", lambda: validate_timestamp(event.timestamp, now=now))
    metadata = check("metadata", lambda: validate_metadata(event.metadata))
    transaction_id = check("transaction_id", lambda: validate_transaction_id(event.transaction_id))
    context: TenantContext | None = None
    if tenant_id is not None:
        if given is not None and given.tenant_id == tenant_id:
            context = given
        else:
            if tenant_id not in found:
                try:
                    found[tenant_id] = get_context(tenant_id)
                except TenantError as error:
                    found[tenant_id] = error
            resolved = found[tenant_id]
            if isinstance(resolved, TenantError):
                problems.setdefault(resolved.field, []).append((resolved.code, str(resolved)))
            else:
                context = resolved
    if problems or context is None:
        return None, None, problems
    valid = ValidEvent(tenant_id, feature, units, timestamp, metadata, transaction_id)
    return valid, context, problems


# ---- the write ----

AdmitHook = Callable[[set[tuple[int, str]], str], None]
StoredManyHook = Callable[[Sequence[StoredFact]], None]
StoredHook = Callable[[ValidEvent, int, TenantContext], None]


def record_many(
    events: Sequence[UsageEvent],
    *,
    contexts: Sequence[TenantContext | None] | None = None,
    on_stored: StoredHook | None = None,
    on_stored_many: StoredManyHook | None = None,
    admit: AdmitHook | None = None,
    using: str | None = None,
    lineages: dict[str, TenantContext] | None = None,
) -> BulkResult:
    """Store a batch of facts all or nothing (module docstring). ``contexts``: the lineage of each event when the
    caller resolved it already (``None`` entries are resolved here). ``on_stored_many(facts)`` (else
    ``on_stored(valid, record_id, context)`` per fact) runs inside the batch's transaction. ``admit(pairs, using)``
    runs inside it after the batch's features are admitted (the events API checks the key's feature budget there);
    a ``TooManyFeatures`` it raises is reported at each index that carries the refused feature. ``lineages``: see
    ``validate_many``.

    Raises ``InvalidBatch`` (nothing stored)."""
    using = using or str(metering_settings.DATABASE_ALIAS)
    items = validate_many(events, contexts, lineages=lineages)
    if log.is_log_mode():
        # The whole batch's features at once (MAX_FEATURES_PER_TREE: a batch of 1,000 new features is refused as a
        # whole, not admitted one at a time), then the caller's own bound (the events API: the key's budget).
        _admit_logged(items, len(events), admit, using)
        return _append_many(items, len(events))
    first: dict[tuple[int, str], _Item] = {}
    duplicates: list[int] = []
    for item in items:
        key = (item.context.tenant.pk, item.valid.transaction_id)
        if key in first:
            duplicates.append(item.index)  # twice in one batch: the first one is the fact
        else:
            first[key] = item
    nested = connections[using].in_atomic_block  # inside a caller's transaction nothing can be retried
    unique = list(first.values())
    stale = 0
    attempt = 0
    while True:
        attempt += 1
        try:
            created = _write(unique, len(events), on_stored, on_stored_many, admit, using)
        except _Stale as error:
            stale += 1
            if stale > STALE_RETRIES:
                raise InvalidBatch(
                    {error.index: {"tenant_id": [("stale_lineage", "the tenant keeps moving; try again")]}},
                    len(events),
                ) from None
            unique = _refresh(unique, len(events))
            if lineages is not None:
                lineages.update((item.context.tenant_id, item.context) for item in unique)
            continue
        except OperationalError as error:
            retryable = getattr(error.__cause__, "sqlstate", None) in RETRYABLE_SQLSTATES
            if retryable and not nested and attempt < MAX_ATTEMPTS:
                continue  # a deadlock or serialization failure with another writer: the batch runs again
            raise
        break
    duplicates += [item.index for item in unique if item.index not in created]
    return BulkResult(created=dict(sorted(created.items())), duplicates=tuple(sorted(duplicates)))


class _Stale(Exception):
    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _refresh(items: list[_Item], count: int) -> list[_Item]:
    """Each tenant's lineage read again from the database (a move, a deactivation since it was cached)."""
    problems: dict[int, Problems] = {}
    fresh: dict[str, TenantContext | TenantError] = {}
    out: list[_Item] = []
    for item in items:
        tenant_id = item.valid.tenant_id
        if tenant_id not in fresh:
            try:
                fresh[tenant_id] = get_context(tenant_id, use_cache=False)
            except TenantError as error:
                fresh[tenant_id] = error
        context = fresh[tenant_id]
        if isinstance(context, TenantError):
            problems[item.index] = {context.field: [(context.code, str(context))]}
        else:
            out.append(_Item(item.index, item.valid, context))
    if problems:
        raise InvalidBatch(problems, count)
    return out


def _lock_order(item: _Item) -> tuple[int, str, datetime, str, str]:
    valid, context = item.valid, item.context
    return (context.root.pk, valid.feature_name, floor_hour(valid.timestamp), context.path, valid.transaction_id)


def _write(
    items: list[_Item],
    count: int,
    on_stored: StoredHook | None,
    on_stored_many: StoredManyHook | None,
    admit: AdmitHook | None,
    using: str,
) -> dict[int, int]:
    """One transaction: {index: fact id} of the facts inserted."""
    from .recorder import features_admitted  # the feature bound lives with the single-fact writer

    items = sorted(items, key=_lock_order)
    roots = sorted({item.context.root.pk for item in items})
    pairs = {(item.context.root.pk, item.valid.feature_name) for item in items}
    with ExitStack() as stack:
        guards = [stack.enter_context(counters.DropIfCommitFails(root_pk)) for root_pk in roots]
        stack.enter_context(transaction.atomic(using=using))
        try:
            stack.enter_context(features_admitted(pairs, using))
            if admit is not None:
                admit(pairs, using)
        except TooManyFeatures as error:
            problems: dict[int, Problems] = {
                item.index: {error.field: [(error.code, str(error))]}
                for item in items
                if (item.context.root.pk, item.valid.feature_name) == (error.root_pk, error.feature_name)
            }
            raise InvalidBatch(problems or {items[0].index: {error.field: [(error.code, str(error))]}}, count) from None
        if not items:
            return {}
        lock_trees(roots, exclusive=False, using=using)
        _check_paths(items, count, using)
        epochs = {root_pk: counters.current_epoch(root_pk, using) for root_pk in roots}
        now = utcnow()
        entries = [
            log.Entry(
                tenant_pk=item.context.tenant.pk,
                path=item.context.path,
                feature=item.valid.feature_name,
                units=item.valid.units,
                timestamp=item.valid.timestamp,
                transaction_id=item.valid.transaction_id,
                recorded_at=now,
                epoch=epochs[item.context.root.pk],
                metadata=item.valid.metadata,
            )
            for item in items
        ]
        inserted = insert_facts(entries, using)
        stored: list[tuple[_Item, StoredFact]] = []
        for item, entry in zip(items, entries, strict=True):
            record_id = inserted.get((entry.tenant_pk, entry.transaction_id))
            if record_id is not None:
                lineage = tuple(level.pk for level in item.context.lineage)
                stored.append((item, StoredFact(record_id, entry.tenant_pk, lineage, entry)))
        rollups.add_many(
            (
                (level, fact.entry.feature, floor_hour(fact.entry.timestamp), fact.entry.units, 1)
                for _, fact in stored
                for level in fact.lineage_pks
            ),
            using=using,
        )
        facts = [fact for _, fact in stored]
        if facts:
            if on_stored_many is not None:
                on_stored_many(facts)
            elif on_stored is not None:
                for item, fact in stored:
                    on_stored(item.valid, fact.record_id, item.context)
        add_many_to_counters(facts, epochs, using)
        for guard in guards:
            guard.counted()
        if facts:
            sent = [(item.valid, fact.record_id, item.context) for item, fact in stored]
            transaction.on_commit(lambda: _send_recorded(sent), using=using)
    return {item.index: fact.record_id for item, fact in stored}


def _check_paths(items: list[_Item], count: int, using: str) -> None:
    """Under the trees' locks: each tenant's path and active flag still the ones its lineage was read with, else
    ``_Stale`` (the lineages are re-read and the batch redone)."""
    tenant_pks = sorted({item.context.tenant.pk for item in items})
    rows: dict[int, tuple[str, bool]] = {}
    for start in range(0, len(tenant_pks), 900):  # SQLite's parameter bound
        part = tenant_pks[start : start + 900]
        for pk, path, active in Tenant.objects.using(using).filter(pk__in=part).values_list("pk", "path", "is_active"):
            rows[pk] = (path, bool(active))
    for item in items:
        row = rows.get(item.context.tenant.pk)
        if row is None or row != (item.context.path, True):
            raise _Stale(item.index)


def _send_recorded(sent: list[tuple[ValidEvent, int, TenantContext]]) -> None:
    """``usage_recorded`` per inserted fact, robust: once committed, a failing receiver never un-stores a fact."""
    if not usage_recorded.receivers:
        return
    for valid, record_id, context in sent:
        for receiver, error in usage_recorded.send_robust(
            sender=UsageRecord, event=valid, record_id=record_id, context=context
        ):
            if isinstance(error, Exception):
                logger.error("usage_recorded receiver %r failed: %s", receiver, error, exc_info=error)


def add_many_to_counters(facts: Sequence[StoredFact], epochs: dict[int, int], using: str) -> None:
    """Add the facts to their trees' live Redis counters (only those that exist), summed per counter key: one
    ``increment_many`` call per tree, all in one pipelined round trip. A tree whose counters another owner holds
    (``counters.NOT_OURS``), or a Redis failure, retires the trees' counters in this transaction instead."""
    # Summed per (lineage, feature, hour) first: every fact of a group adds to the same counters, whose names cost
    # real time to build (measured: 60% of a 20,000-event import's Python went to one name list per fact).
    groups: dict[tuple[tuple[int, ...], str, datetime], int] = {}
    retire: set[int] = set()
    for fact in facts:
        if epochs[fact.lineage_pks[0]] == counters.NOT_OURS:
            retire.add(fact.lineage_pks[0])
            continue
        group = (fact.lineage_pks, fact.entry.feature, floor_hour(fact.entry.timestamp))
        groups[group] = groups.get(group, 0) + fact.entry.units
    by_tree: dict[int, dict[str, int]] = {}
    for (lineage, feature, hour), units in groups.items():
        sums = by_tree.setdefault(lineage[0], {})
        for name in counters.keys_for_fact(lineage, feature, hour, epoch=epochs[lineage[0]]):
            sums[name] = sums.get(name, 0) + units
    if retire:
        counters.bump_epochs(retire, using)
    if not by_tree:
        return
    redis = counters.client()
    if redis is None:
        return
    try:
        pipe = redis.pipeline(transaction=False)
        increment = scripts.script(redis, "metering", "increment_many")
        for sums in by_tree.values():
            names = sorted(sums)
            increment(keys=names, args=[str(sums[name]) for name in names], client=pipe)
        pipe.execute()
    except counters.RedisError as error:
        counters.note_unreachable()
        logger.log(
            log_level(error), "usage counters missed a batch (%s); retiring its trees' counters", type(error).__name__
        )
        counters.bump_epochs(by_tree, using)


# ---- the one batch insert ----


def insert_facts(entries: Sequence[log.Entry], using: str) -> dict[tuple[int, str], int]:
    """Insert the facts (the database skips those it has); returns {(tenant pk, transaction id): new fact id} of the
    rows inserted. PostgreSQL: COPY into a temporary table and one INSERT ... SELECT; elsewhere multi-row VALUES.
    The entries must not repeat a (tenant, transaction id) (the callers keep the first)."""
    if not entries:
        return {}
    connection = connections[using]
    table = connection.ops.quote_name(UsageRecord._meta.db_table)
    columns = "tenant_id, feature, units, timestamp, transaction_id, metadata, recorded_at"
    conflict = "ON CONFLICT (tenant_id, transaction_id) DO NOTHING RETURNING id, tenant_id, transaction_id"
    inserted: dict[tuple[int, str], int] = {}
    try:
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                rows = _insert_postgresql(connection, cursor, entries, table, columns, conflict, using)
            else:
                rows = _insert_values(connection, cursor, entries, table, columns, conflict)
    except DataError as error:
        if rollups.out_of_range(error):
            raise rollups.refusal(entries[0].feature) from None
        raise
    for record_id, tenant_pk, transaction_id in rows:
        inserted[(int(tenant_pk), str(transaction_id))] = int(record_id)
    return inserted


def _insert_postgresql(
    connection: Any, cursor: Any, entries: Sequence[log.Entry], table: str, columns: str, conflict: str, using: str
) -> list[Any]:
    # COPY into a session-local temporary table, then one INSERT ... SELECT that also empties it (a mover drains
    # several batches in one transaction): measured twice as fast as one INSERT of unnest() arrays, which is itself
    # several times faster than a multi-row VALUES of 35,000 placeholders.
    # Created when missing, in every batch: one cheap statement, and never wrong about a table a rolled-back
    # transaction took with it (caching "this session has it" was, when its creator's commit was only simulated).
    cursor.execute(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING} (tenant_id bigint, feature varchar, "
        "units bigint, timestamp timestamptz, transaction_id varchar, metadata jsonb, "
        "recorded_at timestamptz) ON COMMIT DELETE ROWS"
    )
    with cursor.cursor.copy(f"COPY {STAGING} FROM STDIN") as copy:
        for entry in entries:
            copy.write_row(
                (
                    entry.tenant_pk,
                    entry.feature,
                    entry.units,
                    entry.timestamp,
                    entry.transaction_id,
                    json.dumps(entry.metadata, ensure_ascii=False),
                    entry.recorded_at,
                )
            )
    cursor.execute(
        f"WITH staged AS (DELETE FROM {STAGING} RETURNING {columns}) "  # noqa: S608 (our names)
        f"INSERT INTO {table} ({columns}) SELECT {columns} FROM staged {conflict}"
    )
    return list(cursor.fetchall())


def _insert_values(
    connection: Any, cursor: Any, entries: Sequence[log.Entry], table: str, columns: str, conflict: str
) -> list[Any]:
    metadata = UsageRecord._meta.get_field("metadata")
    adapt = connection.ops.adapt_datetimefield_value
    rows: list[Any] = []
    for start in range(0, len(entries), INSERT_CHUNK):
        part = entries[start : start + INSERT_CHUNK]
        params: list[Any] = []
        for entry in part:
            params += [
                entry.tenant_pk,
                entry.feature,
                entry.units,
                adapt(entry.timestamp),
                entry.transaction_id,
                metadata.get_db_prep_save(entry.metadata, connection),
                adapt(entry.recorded_at),
            ]
        values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * len(part))
        cursor.execute(f"INSERT INTO {table} ({columns}) VALUES {values} {conflict}", params)  # noqa: S608
        rows += cursor.fetchall()
    return rows


# ---- log mode ----


def _admit_logged(items: list[_Item], count: int, admit: AdmitHook | None, using: str) -> None:
    """Log mode: the batch's features admitted (``MAX_FEATURES_PER_TREE``) and ``admit`` run, in one short
    transaction before anything is appended; a refused feature refuses the whole batch, reported at each index that
    carries it (as commit mode's ``_write``)."""
    from .recorder import features_admitted

    pairs = {(item.context.root.pk, item.valid.feature_name) for item in items}
    try:
        with transaction.atomic(using=using), features_admitted(pairs, using):
            if admit is not None:
                admit(pairs, using)
    except TooManyFeatures as error:
        problems: dict[int, Problems] = {
            item.index: {error.field: [(error.code, str(error))]}
            for item in items
            if (item.context.root.pk, item.valid.feature_name) == (error.root_pk, error.feature_name)
        }
        raise InvalidBatch(problems or {items[0].index: {error.field: [(error.code, str(error))]}}, count) from None


def _append_many(items: list[_Item], count: int) -> BulkResult:
    """Log mode: the batch's facts counted and appended, one script call per tree (``appender.append_many``)."""
    from . import appender

    first: dict[tuple[int, str], _Item] = {}
    duplicates: list[int] = []
    for item in items:
        key = (item.context.tenant.pk, item.valid.transaction_id)
        if key in first:
            duplicates.append(item.index)
        else:
            first[key] = item
    unique = list(first.values())
    try:
        entry_ids = appender.append_many([item.valid for item in unique])
    except TooManyFeatures as error:
        raise InvalidBatch(
            {
                item.index: {error.field: [(error.code, str(error))]}
                for item in unique
                if (item.context.root.pk, item.valid.feature_name) == (error.root_pk, error.feature_name)
            }
            or {unique[0].index: {error.field: [(error.code, str(error))]}},
            count,
        ) from None
    except TenantError as error:  # deactivated or removed since validation: nothing was appended
        raise InvalidBatch(
            {
                item.index: {error.field: [(error.code, str(error))]}
                for item in unique
                if item.valid.tenant_id in str(error)
            }
            or {unique[0].index: {error.field: [(error.code, str(error))]}},
            count,
        ) from None
    created: dict[int, int] = {}
    for item, entry_id in zip(unique, entry_ids, strict=True):
        if entry_id is None:
            duplicates.append(item.index)
        else:
            created[item.index] = 0  # no id before the drainer persists it
    return BulkResult(created=dict(sorted(created.items())), duplicates=tuple(sorted(duplicates)))


__all__ = [
    "BulkResult",
    "InvalidBatch",
    "StoredFact",
    "insert_facts",
    "record_many",
    "validate_many",
]
