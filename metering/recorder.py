"""Where a fact is written in commit mode: one explicit write unit, ``FactWrite``, that every caller drives.

Follow one fact, say ``QuotaPolicyHandler("key-1").consume("llm_tokens", 3)`` (``quotas.handler``), or
``get_meter().record_usage(event)`` without quotas (``record`` below):

1. ``write = FactWrite(event, context=..., on_stored=...)`` validates the event (``metering.events``: bad input
   raises a named ``InvalidUsageEvent`` before anything is written) and resolves the tenant's lineage
   (``tenants.lineage``, cached; ``write.context``).
2. ``with write.open(exclusive=..., lock_names=..., count=..., rollups_first=...) as fact:`` opens one transaction
   (``transaction.atomic``: a savepoint inside a caller's) and, in it, in this order:
   - admits the feature (``METERING["MAX_FEATURES_PER_TREE"]``, ``admit_features`` below);
   - locks the tree (``tenants.locks``): shared, so writers of one tree run side by side, or exclusively when the
     caller asks (a counter rebuild, Redis unreachable: no other writer of the tree may be in flight); then the
     named locks the caller asks for (the quota database path serializes one tree's decisions on one feature);
   - inserts the fact, idempotent on ``(tenant, transaction_id)``, and only if the tenant's path is still the one
     the lineage was cached with (re-checked under the tree lock). The same statement reads the tree's counter
     epoch (``fact.epoch``, see ``metering.counters``) and, with ``rollups_first``, adds the fact to the hourly
     rollups of every level. A duplicate raises ``DuplicateUsageEvent`` (nothing written); a stale lineage rolls
     the transaction back, re-reads ``write.context`` and raises ``StaleLineage``: open again;
   - runs ``on_stored(valid, record_id, context)`` (an adapter's outbox row: it commits or rolls back with the fact).
3. The body of the ``with`` block is the caller's decision, if it has one. ``quotas.handler`` asks
   ``quotas.ledger.decide``, which *returns* a ``Decision`` and, when it admits, has counted the fact in the live
   counters; the handler raises a refusal (rolling everything back) or calls ``fact.counted()``. Nothing here
   calls quotas: the unit only exposes what the decision needs (``fact.context``, ``fact.epoch``, ``fact.record_id``,
   ``fact.rollups_written``), and the caller's own statements (closing a reservation) join the transaction.
4. Leaving the block without an error finishes the unit: the fact is added to the live Redis counters unless the
   caller counted it (``count=False``), the rollups are upserted unless written with the fact (last, right before
   ``COMMIT``, so the rollup rows every writer of the tree shares stay locked for the shortest time, never while a
   process talks to Redis), and the transaction commits. ``usage_recorded`` is sent after the commit (robust: a
   failing receiver is logged and never un-stores a fact). An error anywhere rolls it all back; when the counters
   had already counted the fact, the tree's counters are retired (``counters.DropIfCommitFails``), so a fact that
   was not stored is never counted.

On PostgreSQL that is ``BEGIN``, the tree lock, the fact (with the epoch), the Redis decision, the rollups, ``COMMIT``.
(An earlier version folded ``BEGIN`` and ``COMMIT`` into the statements, by switching psycopg's autocommit inside
``atomic()``, and sent several statements as one query string: measured in-process with interleaved rounds, that
gained 2-7% requests/s, within the noise, so plain ``transaction.atomic`` replaced it; the script,
``bench/fold_compare.py``, is in the git history with the figures in its commit message.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import Any

from django.db import DataError, connections, transaction

from tenants.context import TenantContext
from tenants.lineage import get_context
from tenants.locks import lock_name, lock_trees
from tenants.models import Tenant

from . import counters, rollups
from .breaker import log_level
from .conf import metering_settings
from .events import UsageEvent, ValidEvent, utcnow, validate_event
from .exceptions import DuplicateUsageEvent, TooManyFeatures
from .models import UsageRecord, UsageRollup
from .signals import usage_recorded
from .windows import floor_hour

logger = logging.getLogger("metering.recorder")

StoredHook = Callable[[ValidEvent, int, TenantContext], None]


class StaleLineage(Exception):
    """The cached lineage no longer matched the tree (a concurrent move, a missed invalidation): nothing was written,
    ``FactWrite.context`` now holds the lineage read from the database; open the unit again."""


class FactWrite:
    """One fact's write unit (commit mode). See the module docstring for the sequence; ``record`` for the simplest
    use. The attributes set by ``open`` (``record_id``, ``epoch``, ``rollups_written``) are valid inside its block."""

    def __init__(
        self, event: UsageEvent, *, context: TenantContext | None = None, on_stored: StoredHook | None = None
    ) -> None:
        self.valid: ValidEvent = validate_event(event)
        if context is None or context.tenant_id != self.valid.tenant_id:
            context = get_context(self.valid.tenant_id)
        self.context: TenantContext = context
        self.on_stored = on_stored
        self.using: str = metering_settings.DATABASE_ALIAS
        self.record_id = 0
        self.epoch = 0
        self.rollups_written = False
        self._counting: counters.DropIfCommitFails | None = None

    @contextmanager
    def open(
        self,
        *,
        exclusive: bool = False,
        lock_names: Sequence[str] = (),
        count: bool = True,
        rollups_first: bool = False,
    ) -> Iterator[FactWrite]:
        """Write the fact in a transaction that commits when the block ends without an error (module docstring).

        ``exclusive``: lock the tree exclusively. ``lock_names``: named locks taken right after the tree lock (for
        ``write.context``: a ``StaleLineage`` retry may bring another root). ``count=False``: the block counts the
        fact in the live counters itself (a quota decision) and calls ``counted()`` once it has; the unit then does
        not. ``rollups_first``: write the rollups with the fact (a decision in the block sums them); otherwise they
        are written last, before ``COMMIT`` (on SQLite always with the fact)."""
        with ExitStack() as stack:
            self._counting = stack.enter_context(counters.DropIfCommitFails(self.context.root.pk))
            stack.enter_context(transaction.atomic(using=self.using))
            rollups_last = not rollups_first and connections[self.using].vendor == "postgresql"
            self._insert(exclusive, lock_names, not rollups_last)
            yield self
            if count:
                add_to_counters(self.valid, [level.pk for level in self.context.lineage], self.using, self.epoch)
                self._counting.counted()
            elif not self._counting.is_counted():
                raise RuntimeError("FactWrite.open(count=False): the block did not count the fact (counted())")
            if rollups_last:
                self._add_rollups()

    def counted(self) -> None:
        """The block's decision has counted the fact in the live counters: from here on, should the transaction not
        commit, the tree's counters are retired."""
        assert self._counting is not None, "counted() belongs inside open()"
        self._counting.counted()

    def _insert(self, exclusive: bool, lock_names: Sequence[str], with_rollups: bool) -> None:
        valid, context, using = self.valid, self.context, self.using
        _admit(valid, context, using)
        lock_trees([context.root.pk], exclusive=exclusive, using=using)
        for name in lock_names:
            lock_name(name, using=using)
        # Each statement has its own snapshot (READ COMMITTED): the path check in the insert sees every move
        # committed before the tree lock was granted.
        lineage_pks = [level.pk for level in context.lineage]
        rows = _insert_fact(valid, context, lineage_pks, with_rollups, using)
        if rows:
            self.record_id, self.epoch = int(rows[0][0]), int(rows[0][1])
            self.rollups_written = with_rollups
            if self.on_stored is not None:
                self.on_stored(valid, self.record_id, context)
            # Sent only if the transaction commits (registered now, so it goes before the callbacks of the decision).
            # robust: once the fact is committed, a failing receiver must not make the caller believe it was not (a
            # retry without a transaction id would record it twice); the error is logged.
            record_id = self.record_id
            transaction.on_commit(
                lambda: usage_recorded.send(sender=UsageRecord, event=valid, record_id=record_id, context=context),
                using=using,
                robust=True,
            )
            return
        existing = (
            UsageRecord.objects.using(using)
            .filter(tenant_id=context.tenant.pk, transaction_id=valid.transaction_id)
            .values_list("id", flat=True)
            .first()
        )
        if existing is not None:
            raise DuplicateUsageEvent(valid.tenant_id, valid.transaction_id, existing)
        # The path check saw a committed move: read the lineage from the database now; the raise rolls this
        # transaction back, and the next open() locks and checks the new path.
        self.context = get_context(valid.tenant_id, use_cache=False)
        raise StaleLineage(valid.tenant_id)

    def _add_rollups(self) -> None:
        lineage_pks = [level.pk for level in self.context.lineage]
        hour = floor_hour(self.valid.timestamp)
        rollups.add(lineage_pks, self.valid.feature_name, hour, self.valid.units, using=self.using)
        self.rollups_written = True


STALE_RETRIES = 3  # a stale lineage is re-read from the database: a second one needs another concurrent move


def record(event: UsageEvent, *, context: TenantContext | None = None, on_stored: StoredHook | None = None) -> int:
    """Store ``event`` exactly once and count it at every level of its lineage, with no decision. Returns its id.

    ``on_stored(valid_event, record_id, context)`` runs inside the fact's transaction."""
    write = FactWrite(event, context=context, on_stored=on_stored)
    for _ in range(STALE_RETRIES):
        try:
            with write.open():
                pass
            return write.record_id
        except StaleLineage:
            continue
    raise StaleLineage(write.valid.tenant_id)


def _insert_fact(
    valid: ValidEvent, context: TenantContext, lineage_pks: list[int], with_rollups: bool, using: str
) -> list[tuple[Any, ...]]:
    """Insert the fact unless the tenant already has its transaction id or its path changed; ``[(id, epoch)]`` or
    ``[]``. ``with_rollups`` (PostgreSQL: in the same statement; elsewhere right after): add it to the rollups."""
    connection = connections[using]
    insert, params = _insert_fact_sql(valid, context, using)
    hour = floor_hour(valid.timestamp)
    try:
        with connection.cursor() as cursor:
            if with_rollups and connection.vendor == "postgresql":
                rollup_sql, rollup_params = rollups.add_for_inserted(
                    "fact", lineage_pks, valid.feature_name, hour, valid.units, using=using
                )
                cursor.execute(
                    f"WITH fact AS ({insert}), rolled AS ({rollup_sql}) SELECT id, epoch FROM fact",  # noqa: S608
                    params + rollup_params,
                )
                return list(cursor.fetchall())
            cursor.execute(insert, params)
            rows = list(cursor.fetchall())
    except DataError as error:
        if rollups.out_of_range(error):
            raise rollups.refusal(valid.feature_name) from None
        raise
    if rows and with_rollups:
        rollups.add(lineage_pks, valid.feature_name, hour, valid.units, using=using)
    return rows


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


def add_to_counters(valid: ValidEvent, lineage_pks: list[int], using: str, epoch: int) -> None:
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
