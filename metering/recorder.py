"""Recording one usage fact: the straight line from an event to durable, counted usage.

validate -> resolve the lineage -> in one transaction: lock the tree shared, insert the fact (idempotent on
``transaction_id``), add it to the live Redis counters (the quota decision, when gated) and to the rollups of every
level -> after commit, send ``usage_recorded``. On PostgreSQL that is two round trips: ``BEGIN``, lock and fact
in one (which also reads the tree's counter epoch, see ``metering.counters``), rollups and ``COMMIT`` in the other
(see ``metering.roundtrip``).
Bad input raises before anything is written; a duplicate raises ``DuplicateUsageEvent`` and writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

from django.db import DataError, connections, transaction

from tenants.context import TenantContext
from tenants.lineage import get_context
from tenants.locks import lock_name, lock_trees, name_lock_statement, tree_lock_statement
from tenants.models import Tenant

from . import counters, rollups, roundtrip
from .breaker import log_level
from .conf import metering_settings
from .events import UsageEvent, ValidEvent, utcnow, validate_event
from .exceptions import DuplicateUsageEvent, TooManyFeatures
from .models import UsageRecord, UsageRollup
from .signals import usage_recorded
from .windows import floor_hour

logger = logging.getLogger("metering.recorder")


class _StaleLineage(Exception):
    """The cached lineage no longer matches the tree (a concurrent move); read it again and retry."""


StoredHook = Callable[[ValidEvent, int, TenantContext], None]


class Gate(Protocol):
    """A decision taken inside the fact's transaction (quotas). Raising from ``count`` stores nothing.

    ``exclusive``: take the tree lock exclusively (no other writer in flight), e.g. to rebuild lost counters.
    """

    exclusive: bool

    def lock_names(self, valid: ValidEvent, context: TenantContext) -> list[str]:
        """Named locks to take right after the tree lock, before the fact is written (``tenants.locks``)."""

    def counts_first(self) -> bool:
        """Whether ``count`` may run before the fact's rollups are written (then written right before ``COMMIT``,
        so the hot rollup rows stay locked for the shortest time). Not when the decision reads the rollups."""

    def with_fact(self, using: str) -> tuple[str, list[Any]] | None:
        """PostgreSQL: a data-modifying statement (``... RETURNING``) sent in the fact's round trip, run only if the
        fact is inserted, which may read the new fact's id as ``(SELECT id FROM fact)``; ``None``: nothing."""

    def count(
        self,
        valid: ValidEvent,
        context: TenantContext,
        record_id: int,
        using: str,
        with_fact_rows: int | None,
        rollups_written: bool,
        epoch: int,
    ) -> None:
        """Runs instead of the plain counter increment: decide and count in one atomic step.

        ``with_fact_rows``: the rows ``with_fact``'s statement returned, or ``None`` if it was not run (it is only
        on PostgreSQL), in which case ``count`` does that work itself. ``rollups_written``: whether the fact is
        already in the rollups (not when ``counts_first`` let them be written after). ``epoch``: the tree's counter
        epoch, read under the tree lock in the fact's statement."""


# ---- the feature bound: METERING["MAX_FEATURES_PER_TREE"] ----

# (database alias, tree root pk, feature) this process saw committed: a fact of a feature its tree already has needs
# no check at all (the hot path). Features never leave a tree's rollups, so an entry never becomes wrong.
_known_features: set[tuple[str, int, str]] = set()
KNOWN_FEATURES_MAX = 100_000  # entries kept; beyond, the set starts again (each miss costs one indexed query)
# (root pk, feature) pairs an enclosing batch already admitted in the current transaction (``features_admitted``).
_admitted: ContextVar[frozenset[tuple[int, str]]] = ContextVar("xaas_admitted_features", default=frozenset())


def forget_known_features() -> None:
    """Empty this process's set of known (tree, feature) pairs (tests; after rollups were deleted by hand)."""
    _known_features.clear()


def _remember(using: str, pairs: Iterable[tuple[int, str]]) -> None:
    if len(_known_features) > KNOWN_FEATURES_MAX:
        _known_features.clear()
    _known_features.update((using, root_pk, feature) for root_pk, feature in pairs)


def _features_present(root_pk: int, features: set[str], using: str) -> set[str]:
    rows = UsageRollup.objects.using(using).filter(tenant_id=root_pk, feature__in=sorted(features))
    return set(rows.values_list("feature", flat=True).distinct())


def _feature_count(root_pk: int, using: str, at_most: int) -> int:
    """Distinct features in the tree's root rollups (every fact is rolled up to the root), counted up to
    ``at_most``: one index probe per feature (a loose index scan on the unique (tenant, feature, bucket) index),
    not one per hourly row."""
    connection = connections[using]
    table = connection.ops.quote_name(UsageRollup._meta.db_table)
    tenant = connection.ops.quote_name(UsageRollup._meta.get_field("tenant").column)
    sql = (
        f"WITH RECURSIVE f(feature) AS ("  # noqa: S608
        f"SELECT MIN(feature) FROM {table} WHERE {tenant} = %s "
        f"UNION ALL SELECT (SELECT MIN(r.feature) FROM {table} r WHERE r.{tenant} = %s AND r.feature > f.feature) "
        f"FROM f WHERE f.feature IS NOT NULL) "
        f"SELECT COUNT(*) FROM (SELECT feature FROM f WHERE feature IS NOT NULL LIMIT %s) counted"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [root_pk, root_pk, at_most])
        return int(cursor.fetchone()[0])


def admit_features(pairs: Iterable[tuple[int, str]], using: str) -> frozenset[tuple[int, str]]:
    """Refuse (``TooManyFeatures``) a fact that would give its tree more than ``MAX_FEATURES_PER_TREE`` features.
    Call inside the transaction that writes the facts, before any of them. Returns the pairs it admitted.

    A pair this process knows costs nothing. Otherwise one indexed query; a feature new to its tree is then
    admitted with the tree locked exclusively (every writer of the tree waits until this transaction ends), so
    two writers introducing the last allowed feature and one more are decided one after the other, never both
    against the same count. Trees are locked in pk order (as every writer of several trees does)."""
    limit = metering_settings.MAX_FEATURES_PER_TREE
    pairs = {(root_pk, feature) for root_pk, feature in pairs}
    if limit is None or not pairs:
        return frozenset(pairs)
    by_root: dict[int, set[str]] = {}
    for root_pk, feature in pairs:
        if (using, root_pk, feature) not in _known_features:
            by_root.setdefault(root_pk, set()).add(feature)
    for root_pk in sorted(by_root):
        features = by_root[root_pk]
        new = features - _features_present(root_pk, features, using)
        if new:
            lock_trees([root_pk], exclusive=True, using=using)
            new -= _features_present(root_pk, new, using)  # committed by another writer while this one waited
        if new:
            room = int(limit) - _feature_count(root_pk, using, int(limit) + 1)
            if len(new) > room:
                refused = sorted(new)[max(room, 0)]
                raise TooManyFeatures(
                    f"feature_name {refused!r} would be new to its tenant tree, which may hold at most {limit} "
                    f"distinct features (METERING['MAX_FEATURES_PER_TREE']); features it already has are accepted",
                    root_pk=root_pk,
                    feature_name=refused,
                )
        done = [(root_pk, feature) for feature in features]
        transaction.on_commit(lambda done=done: _remember(using, done), using=using)  # type: ignore[misc]
    return frozenset(pairs)


def admit_features_for_key(subtree_pk: int, root_pk: int, features: Iterable[str], using: str) -> None:
    """Refuse (``TooManyFeatures``) features new to the tree ``root_pk`` brought in by an API key of the tenant
    ``subtree_pk`` below its root once that tenant's subtree holds ``MAX_FEATURES_PER_KEY`` distinct features: so
    one key cannot spend the whole tree's ``MAX_FEATURES_PER_TREE`` and leave the rest of the organization unable
    to record any new feature. Features the tree already has are always free; a root's key has the tree's budget.

    Call inside ``features_admitted`` for the same features: a feature new to the tree has the tree locked
    exclusively there, so the count below cannot move before this transaction ends."""
    budget = metering_settings.MAX_FEATURES_PER_KEY
    if budget is None or subtree_pk == root_pk:
        return
    unknown = {feature for feature in features if (using, root_pk, feature) not in _known_features}
    new = unknown - _features_present(root_pk, unknown, using) if unknown else set()
    if not new:
        return
    room = int(budget) - _feature_count(subtree_pk, using, int(budget) + 1)
    if len(new) > room:
        refused = sorted(new)[max(room, 0)]
        raise TooManyFeatures(
            f"feature_name {refused!r} would be new to its tenant tree, and this API key's subtree already holds "
            f"{budget} distinct features (METERING['MAX_FEATURES_PER_KEY']); features the tree already has are "
            f"accepted",
            root_pk=root_pk,
            feature_name=refused,
        )


@contextmanager
def features_admitted(pairs: Iterable[tuple[int, str]], using: str) -> Iterator[None]:
    """``admit_features`` for a whole batch at once (inside its transaction, before its first fact): its facts then
    skip their own check, and the trees are locked before any of them is written."""
    admitted = admit_features(pairs, using)
    token = _admitted.set(_admitted.get() | admitted)
    try:
        yield
    finally:
        _admitted.reset(token)


def _admit(valid: ValidEvent, context: TenantContext, using: str) -> None:
    pair = (context.root.pk, valid.feature_name)
    if (using, *pair) in _known_features or pair in _admitted.get():
        return
    admit_features([pair], using)


def record(
    event: UsageEvent,
    *,
    context: TenantContext | None = None,
    on_stored: StoredHook | None = None,
    gate: Gate | None = None,
) -> int:
    """Store ``event`` exactly once and count it at every level of its lineage. Returns the fact's id.

    ``on_stored(valid_event, record_id, context)`` runs inside the fact's transaction (an adapter's outbox row is
    written there, so it commits or rolls back with the fact). ``gate`` lets the quotas refuse the fact atomically.
    """
    valid = validate_event(event)
    if context is None or context.tenant_id != valid.tenant_id:
        context = get_context(valid.tenant_id)
    try:
        return _record(valid, context, on_stored, gate)
    except _StaleLineage:
        return _record(valid, get_context(valid.tenant_id, use_cache=False), on_stored, gate)


def _record(valid: ValidEvent, context: TenantContext, on_stored: StoredHook | None, gate: Gate | None) -> int:
    using = metering_settings.DATABASE_ALIAS
    lineage_pks = [level.pk for level in context.lineage]
    # On PostgreSQL, when the decision does not read the rollups: BEGIN, the locks and the fact in one round trip;
    # the counters (Redis); the rollups and COMMIT in one round trip. The rollup rows every writer of the tree
    # shares are then locked only while the server upserts and commits, never while this process works.
    rollups_last = connections[using].vendor == "postgresql" and (gate is None or gate.counts_first())
    with counters.DropIfCommitFails(lineage_pks[0]) as counting, roundtrip.atomic(using) as batch:
        _admit(valid, context, using)
        locks = [] if gate is None else gate.lock_names(valid, context)
        extra = None if gate is None else gate.with_fact(using)
        exclusive = bool(gate and gate.exclusive)
        record_id, extra_rows, epoch = _write_fact(batch, valid, context, exclusive, locks, extra, not rollups_last)
        if on_stored is not None:
            on_stored(valid, record_id, context)
        if gate is not None:
            gate.count(valid, context, record_id, using, extra_rows, not rollups_last, epoch)
        else:
            count(valid, lineage_pks, using, epoch)
        counting.counted()
        # robust: once the fact is committed, a failing receiver must not make the caller believe it was not
        # (a retry without a transaction id would record it twice); the error is logged.
        transaction.on_commit(
            lambda: usage_recorded.send(sender=UsageRecord, event=valid, record_id=record_id, context=context),
            using=using,
            robust=True,
        )
        if rollups_last:
            hour = floor_hour(valid.timestamp)
            rollup = rollups.add_statement(lineage_pks, valid.feature_name, hour, valid.units, using=using)
            try:
                batch.execute_last([rollup])
            except DataError as error:
                if rollups.out_of_range(error):
                    raise rollups.refusal(valid.feature_name) from None
                raise
    return record_id


def _write_fact(
    batch: roundtrip.Batch,
    valid: ValidEvent,
    context: TenantContext,
    exclusive: bool,
    lock_names: list[str],
    with_fact: tuple[str, list[Any]] | None,
    with_rollups: bool = True,
) -> tuple[int, int | None, int]:
    """Lock the tree, insert the fact unless the tenant already has this transaction id (and only if the lineage is
    current), add it to every level's rollups (unless ``with_rollups`` is false: PostgreSQL only, the caller adds
    them). On PostgreSQL one round trip, ``with_fact`` included (its row count is returned with the fact's id and
    the tree's counter epoch); elsewhere one statement at a time, ``with_fact`` left to its caller."""
    extra_rows: int | None = None
    epoch = 0
    using = batch.using
    connection = connections[using]
    lineage_pks = [level.pk for level in context.lineage]
    hour = floor_hour(valid.timestamp)
    insert, params = _insert_fact_sql(valid, context, using)
    if connection.vendor == "postgresql":
        statements: list[roundtrip.Statement] = [tree_lock_statement(lineage_pks[0], exclusive=exclusive)]
        statements += [name_lock_statement(name) for name in lock_names]
        # Each statement has its own snapshot: the path check below sees every move committed before the lock.
        rolled = ""
        if with_rollups:
            rollup_sql, rollup_params = rollups.add_for_inserted(
                "fact", lineage_pks, valid.feature_name, hour, valid.units, using=using
            )
            rolled = f", rolled AS ({rollup_sql})"
            params += rollup_params
        extra_cte, extra_count = "", "NULL"
        if with_fact is not None:
            extra_cte, extra_count = f", extra AS ({with_fact[0]})", "(SELECT count(*) FROM extra)"
            params += with_fact[1]
        fact_and_rollups = (
            f"WITH fact AS ({insert}){rolled}{extra_cte} "  # noqa: S608
            f"SELECT fact.id, {extra_count}, fact.epoch FROM fact"
        )
        statements.append((fact_and_rollups, params))
        try:
            rows = batch.execute(statements)
        except DataError as error:
            if rollups.out_of_range(error):
                raise rollups.refusal(valid.feature_name) from None
            raise
        record_id = int(rows[0][0]) if rows else None
        if rows:
            extra_rows = None if with_fact is None else int(rows[0][1])
            epoch = int(rows[0][2])
    else:
        lock_trees([lineage_pks[0]], exclusive=exclusive, using=using)
        for name in lock_names:
            lock_name(name, using=using)
        rows = batch.execute([(insert, params)])
        record_id = int(rows[0][0]) if rows else None
        if record_id is not None:
            epoch = int(rows[0][1])
            rollups.add(lineage_pks, valid.feature_name, hour, valid.units, using=using)
    if record_id is not None:
        return record_id, extra_rows, epoch
    existing = (
        UsageRecord.objects.using(using)
        .filter(tenant_id=context.tenant.pk, transaction_id=valid.transaction_id)
        .values_list("id", flat=True)
        .first()
    )
    if existing is not None:
        raise DuplicateUsageEvent(valid.tenant_id, valid.transaction_id, existing)
    raise _StaleLineage()


def _insert_fact_sql(valid: ValidEvent, context: TenantContext, using: str) -> tuple[str, list[Any]]:
    connection = connections[using]
    facts = connection.ops.quote_name(UsageRecord._meta.db_table)
    tenants = connection.ops.quote_name(Tenant._meta.db_table)
    metadata_field = UsageRecord._meta.get_field("metadata")
    # The WHERE EXISTS re-checks, under the tree lock, the path the lineage was cached with; the tree's counter
    # epoch comes back with the fact's id (a statement the hot path sends anyway).
    epoch_sql, epoch_params = counters.epoch_subquery(context.root.pk, using)
    sql = (
        f"INSERT INTO {facts} (tenant_id, feature, units, timestamp, transaction_id, metadata, recorded_at) "  # noqa: S608
        f"SELECT %s, %s, %s, %s, %s, %s, %s WHERE EXISTS "
        f"(SELECT 1 FROM {tenants} WHERE id = %s AND path = %s AND is_active) "
        f"ON CONFLICT (tenant_id, transaction_id) DO NOTHING RETURNING id, {epoch_sql} AS epoch"
    )
    params = [
        context.tenant.pk,
        valid.feature_name,
        valid.units,
        connection.ops.adapt_datetimefield_value(valid.timestamp),
        valid.transaction_id,
        metadata_field.get_db_prep_save(valid.metadata, connection),
        connection.ops.adapt_datetimefield_value(utcnow()),
        context.tenant.pk,
        context.path,
        *epoch_params,
    ]
    return sql, params


def count(valid: ValidEvent, lineage_pks: list[int], using: str, epoch: int) -> None:
    """Add the fact to the tree's live Redis counters (those that exist; see ``metering.counters``)."""
    if epoch == counters.NOT_OURS:
        # The tree's live counters are another owner's (``counters.counter_owner``), which cannot see this fact:
        # retire them as of this commit and claim the tree. A write that decides nothing may do so under the
        # shared lock: any decision beside it is one that came first.
        counters.bump_epochs([lineage_pks[0]], using)
        return
    redis = counters.client()
    if redis is None:
        return
    keys = counters.keys_for_fact(lineage_pks, valid.feature_name, valid.timestamp, epoch=epoch)
    try:
        counters.increment_existing(redis, keys, valid.units)
    except counters.RedisError as error:
        # The fact is the truth and still commits; the counters that missed it are retired with it (epoch bump in
        # this transaction), so no decision uses them again, whenever and with whatever data Redis comes back.
        counters.note_unreachable()
        logger.log(
            log_level(error), "usage counters missed a fact (%s); retiring the tree's counters", type(error).__name__
        )
        counters.bump_epochs([lineage_pks[0]], using)
