"""Log mode: where a fact is written (``METERING["WRITE_MODE"] = "log"``). One Redis round trip per admitted fact.

A write is ONE call of ``lua/log_append.lua`` on the tree's keys (``metering.log``): it checks that Redis's state of
the tree has the caller's counter epoch, that the transaction id is not in the de-duplication window, that every
counter of the limits handed to it exists and that no hard limit would be passed; then it adds the fact to every
live counter of the lineage, sets the de-duplication key (``LOG_DEDUP_SECONDS``) and appends the ``Entry`` to the
tree's stream. The drainer (``metering.drain``) persists the stream to the database in batches. Nothing here reads
the database on the hot path:

- **The lineage and the epoch come from this process's memory** (``snapshot``), read together in one statement
  (one snapshot of the database: a deactivation and its epoch bump are seen together or not at all), kept at most
  ``LOG_REFRESH_SECONDS``. The script validates the epoch on every write. Issue 10's rule (no lineage in a
  per-process cache) holds because of that validation: every change that must be seen at once — a limit
  (``QuotaLimit.save``), a tenant deactivated or reactivated, an exemption granted or removed, a move, a counter
  repair — bumps the tree's epoch in its own transaction (``counters.bump_epochs``), and after its commit the new
  epoch is pushed into the tree's Redis state (``push_epochs``). From that push on, a process holding the old epoch
  gets "stale", re-reads the lineage and epoch from the database, and retries: **a deactivated tenant, a moved one
  or an old limit is never written for after the change is committed and pushed; should the push be lost (Redis
  unreachable right then), at most ``LOG_REFRESH_SECONDS`` later** (the first process that re-reads pushes the
  database's epoch). Pushes are compare-and-set against the retired epochs (``lua/log_epoch.lua``), so a late push
  of an older epoch never brings back counters that missed writes.
- **Missing counters** (Redis restarted, a TTL, a new epoch) are rebuilt (``rebuild``): in one database
  transaction, the tree locked exclusively (reservation writers wait, as in commit mode), the drain cursor locked
  (``drain.drain_locked``: the database's facts and rollups are exactly the stream up to ``last_entry``), the
  database's sums, then ONE call of ``lua/log_rebuild.lua`` that creates each missing counter as the database's sum
  plus the units of the stream's entries after ``last_entry`` that fall in it. An append before that call is in the
  stream after the cursor; an append after it finds the counter: exact whatever was appended meanwhile.
- **The state hash missing** (a new Redis, a flush): ``drain.open_tree`` reopens the tree's log (a ``LogGap`` when
  entries may be lost, the epoch bumped) and the write retries.
- **Redis unreachable or hung**: ``LogStoreUnavailable`` (a JSON 503 with ``Retry-After`` over HTTP); nothing is
  written (the script is atomic: a call that timed out either ran whole or not at all). Socket timeouts bound it.

**De-duplication window**: a transaction id reused within ``LOG_DEDUP_SECONDS`` (default an hour) of its first use
is refused at once (``DuplicateUsageEvent``, with the first one's stream ``entry_id``). Reused later, it is admitted
and counted at request time, and the drainer finds the database already holding it: the fact is stored once and
its units are given back to the live counters (so they may refuse a little more in between, never less).

**What a writer returns**: no fact id (the fact is not in the database yet): ``record_fact`` returns 0 in log mode.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, IntegrityError, connections, transaction
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver

from tenants import namespace
from tenants.context import TenantContext, TenantRef
from tenants.exceptions import InactiveTenant, UnknownTenant
from tenants.lineage import validate_tenant_id
from tenants.locks import lock_trees
from tenants.models import Tenant

from . import counters, log, scripts
from .conf import metering_settings
from .events import ValidEvent, utcnow
from .exceptions import DuplicateUsageEvent, LogStoreUnavailable
from .models import CounterEpoch, UsageRecord
from .windows import Period, window

logger = logging.getLogger("metering.appender")

MAX_ATTEMPTS = 16  # repairs in a row before a write gives up (LogStoreUnavailable): only under constant churn
SNAPSHOTS_MAX = 100_000  # entries kept; beyond, the cache starts again

# Answers of log_append.lua (its header says what follows each).
STATE_MISSING, STALE, DUPLICATE, COUNTERS_MISSING, REFUSED, ADMITTED = range(6)


# ---- the per-process snapshot of a tenant's lineage and its tree's epoch ----


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A tenant's lineage and its tree's counter epoch, read in one statement at ``loaded_at`` (monotonic)."""

    context: TenantContext
    epoch: int
    loaded_at: float

    @property
    def root_pk(self) -> int:
        return self.context.root.pk


_snapshots: dict[tuple[str, str], Snapshot] = {}


def forget_snapshots() -> None:
    """Empty this process's snapshots (tests; the epochs make it unnecessary otherwise)."""
    _snapshots.clear()


def snapshot(tenant_id: str, *, fresh: bool = False) -> Snapshot:
    """The tenant's lineage and epoch: from memory when read less than ``LOG_REFRESH_SECONDS`` ago (and not
    ``fresh``), else from the database (one query). Raises ``UnknownTenant``/``InactiveTenant``."""
    tenant_id = validate_tenant_id(tenant_id)
    entry = (namespace.current().hash, tenant_id)
    now = time.monotonic()
    cached = _snapshots.get(entry)
    if cached is not None and not fresh and now - cached.loaded_at < float(metering_settings.LOG_REFRESH_SECONDS):
        return cached
    loaded = _load(tenant_id, now)
    if len(_snapshots) >= SNAPSHOTS_MAX:
        _snapshots.clear()
    _snapshots[entry] = loaded
    return loaded


def _load(tenant_id: str, now: float) -> Snapshot:
    using = metering_settings.DATABASE_ALIAS
    connection = connections[using]
    table = connection.ops.quote_name(Tenant._meta.db_table)
    epochs = connection.ops.quote_name(CounterEpoch._meta.db_table)
    # One statement, one snapshot of the database: the lineage and the epoch of its root as of the same commit, so a
    # change and the epoch bump in its transaction are seen together or not at all.
    sql = f"""
        WITH RECURSIVE lineage(id, external_id, kind, exempt, is_active, parent_id, depth) AS (
            SELECT id, external_id, kind, exempt, is_active, parent_id, depth FROM {table} WHERE external_id = %s
            UNION ALL
            SELECT t.id, t.external_id, t.kind, t.exempt, t.is_active, t.parent_id, t.depth
            FROM {table} t JOIN lineage ON t.id = lineage.parent_id
        )
        SELECT id, external_id, kind, exempt, is_active,
            COALESCE((SELECT CASE WHEN e.owner = %s THEN e.epoch ELSE {counters.NOT_OURS} END FROM {epochs} e
                      WHERE e.root_id = (SELECT id FROM lineage WHERE parent_id IS NULL)), {counters.NOT_OURS})
        FROM lineage ORDER BY depth
    """  # noqa: S608 (our tables; the values are parameters)
    with connection.cursor() as cursor:
        cursor.execute(sql, [tenant_id, counters.counter_owner()])
        rows = cursor.fetchall()
    if not rows:
        raise UnknownTenant(f"unknown tenant {tenant_id!r}")
    lineage = tuple(
        TenantRef(int(pk), ext, kind, bool(exempt), bool(active)) for pk, ext, kind, exempt, active, _ in rows
    )
    context = TenantContext(tenant_id=tenant_id, lineage=lineage)
    if not context.is_active:
        inactive = next(level.tenant_id for level in context.lineage if not level.is_active)
        raise InactiveTenant(f"tenant {tenant_id!r} is inactive (deactivated at {inactive!r})")
    return Snapshot(context, int(rows[0][5]), now)


# ---- one write ----


@dataclass(frozen=True, slots=True)
class Limit:
    """A limit on a counter, handed in by the caller (``quotas`` builds them from its rules): the used + reserved
    units of level ``tenant_pk``'s ``period`` window starting at ``start`` (``None``: all time) may not pass
    ``limit_units`` with the write's ``check_units`` added, when ``hard``."""

    tenant_pk: int
    level_path: str
    period: Period
    start: datetime | None
    end: datetime | None
    limit_units: int
    hard: bool


@dataclass(frozen=True, slots=True)
class Change:
    """What one write counts: ``used_delta`` in the windows of ``used_at``, ``reserved_delta`` in those of
    ``reserved_at`` (every level of the lineage), after checking ``check_units`` against the limits."""

    feature: str
    check_units: int = 0
    used_delta: int = 0
    used_at: datetime | None = None
    reserved_delta: int = 0
    reserved_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The script's answer. ``admitted``: ``before`` holds (used, reserved) per limit before the write, ``entry_id``
    the appended entry ('' when nothing was appended). Refused: ``refused`` is the index of the limit (0-based) and
    ``before`` its (used, reserved). Otherwise the attempt changed nothing and ``needs`` says what to repair before
    the next one (``repair``): ``"stale"`` (Redis holds ``redis_epoch``), ``"state"`` (no state hash),
    ``"counters"`` (the limits' counters are missing) or ``"claim"`` (no epoch of ours)."""

    admitted: bool = False
    entry_id: str = ""
    before: tuple[tuple[int, int], ...] = ()
    refused: int | None = None
    needs: str = ""
    redis_epoch: str = ""
    snapshot: Snapshot | None = None
    feature: str = ""
    limits: tuple[Limit, ...] = ()

    @property
    def retry(self) -> bool:
        return bool(self.needs)


def _redis() -> Any:
    redis = counters.client()
    if redis is None:
        raise LogStoreUnavailable("log mode needs the metering cache (METERING['CACHE_ALIAS']) to be django-redis")
    return redis


def _unavailable(error: BaseException) -> LogStoreUnavailable:
    counters.note_unreachable()
    logger.warning("log mode: Redis unavailable, nothing written: %s", type(error).__name__)
    return LogStoreUnavailable(f"Redis is unavailable ({type(error).__name__}); nothing was written")


def dedup_seconds() -> int:
    """``LOG_DEDUP_SECONDS``, checked before any write: the script sets the window's key *after* counting and
    appending, so a value Redis refuses (below one second) would fail the call half-way (check E005)."""
    value = metering_settings.LOG_DEDUP_SECONDS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ImproperlyConfigured(f"METERING['LOG_DEDUP_SECONDS'] must be a positive integer, got {value!r}")
    return value


def counter_keys(snap: Snapshot, feature: str, limit: Limit, epoch: int) -> tuple[str, str]:
    root = snap.root_pk
    return (
        counters.key(root, limit.tenant_pk, feature, limit.period, limit.start, counters.USED, epoch=epoch),
        counters.key(root, limit.tenant_pk, feature, limit.period, limit.start, counters.RESERVED, epoch=epoch),
    )


def attempt(
    snap: Snapshot,
    change: Change,
    limits: Sequence[Limit] = (),
    *,
    valid: ValidEvent | None = None,
    reservation: int | None = None,
) -> Outcome:
    """One script call: decide ``limits``, count ``change`` and append ``valid`` (when given) to the tree's stream.

    Raises ``DuplicateUsageEvent`` (the transaction id is in the window) and ``LogStoreUnavailable``. When the
    answer is stale, state missing or counters missing, nothing changed: the caller calls ``repair`` (outside any
    transaction of its own: a rebuild must not sum the caller's uncommitted rows) and attempts again with the
    snapshot it returns, rebuilding its limits for it (its rules may depend on the epoch)."""
    redis = _redis()
    epoch = snap.epoch
    pending = {"snapshot": snap, "feature": change.feature, "limits": tuple(limits)}
    if epoch == counters.NOT_OURS:
        return Outcome(needs="claim", **pending)  # type: ignore[arg-type]
    root = snap.root_pk
    lineage = [level.pk for level in snap.context.lineage]
    keys = [log.state_key(root), log.state_key(root), log.state_key(root), log.state_key(root)]
    args: list[str] = [str(epoch), str(dedup_seconds())]
    limit_keys: list[str] = []
    limit_args: list[str] = []
    for limit in limits:
        limit_keys += counter_keys(snap, change.feature, limit, epoch)
        limit_args += [str(limit.limit_units), "1" if limit.hard else "0"]
    used_keys = (
        counters.keys_for_fact(lineage, change.feature, change.used_at, counters.USED, epoch=epoch)
        if change.used_delta and change.used_at is not None
        else []
    )
    reserved_keys = (
        counters.keys_for_fact(lineage, change.feature, change.reserved_at, counters.RESERVED, epoch=epoch)
        if change.reserved_delta and change.reserved_at is not None
        else []
    )
    fields: list[str] = []
    if valid is not None:
        keys[1:4] = [
            log.dedup_key(root, snap.context.tenant.pk, valid.transaction_id),
            log.stream_key(root),
            log.listed_key(root),
        ]
        fields = log.Entry(
            tenant_pk=snap.context.tenant.pk,
            path=snap.context.path,
            feature=valid.feature_name,
            units=valid.units,
            timestamp=valid.timestamp,
            transaction_id=valid.transaction_id,
            recorded_at=utcnow(),
            epoch=epoch,
            metadata=valid.metadata,
            reservation=reservation,
        ).encode()
    args += [
        str(len(limits)),
        str(len(used_keys)),
        str(len(reserved_keys)),
        str(change.used_delta),
        str(change.reserved_delta),
        str(change.check_units),
        str(log.LISTED_SECONDS),
        str(len(fields)),
        *limit_args,
        *fields,
    ]
    try:
        answer = scripts.script(redis, "metering", "log_append")(
            keys=keys + limit_keys + used_keys + reserved_keys, args=args
        )
    except counters.RedisError as error:
        raise _unavailable(error) from None
    status = int(answer[0])
    if status == ADMITTED:
        entry_id = _text(answer[1])
        if int(answer[2]):
            _list_tree(redis, root)
        if entry_id and metering_settings.LOG_DRAIN_EAGER:
            _drain_eagerly(root)
        values = [int(value) for value in answer[3:]]
        return Outcome(admitted=True, entry_id=entry_id, before=tuple(zip(values[0::2], values[1::2], strict=True)))
    if status == REFUSED:
        return Outcome(refused=int(answer[1]) - 1, before=((int(answer[2]), int(answer[3])),))
    if status == DUPLICATE:
        assert valid is not None
        record_id = _stored_id(snap.context.tenant.pk, valid.transaction_id)
        raise DuplicateUsageEvent(valid.tenant_id, valid.transaction_id, record_id, entry_id=_text(answer[1]))
    if status == STALE:
        return Outcome(needs="stale", redis_epoch=_text(answer[1]), **pending)  # type: ignore[arg-type]
    if status == STATE_MISSING:
        return Outcome(needs="state", **pending)  # type: ignore[arg-type]
    if status == COUNTERS_MISSING:
        return Outcome(needs="counters", **pending)  # type: ignore[arg-type]
    raise RuntimeError(f"log_append.lua answered {answer!r}")  # pragma: no cover


def repair(outcome: Outcome) -> Snapshot:
    """Do what an attempt that changed nothing needs (re-read and push the epoch, open the tree, rebuild counters,
    claim the tree); returns the snapshot for the next attempt. Call outside the caller's own transaction."""
    snap = outcome.snapshot
    assert snap is not None
    if outcome.needs == "stale":
        return refresh(snap, outcome.redis_epoch)
    if outcome.needs == "state":
        return reopen(snap)
    if outcome.needs == "counters":
        return rebuild(snap, outcome.feature, outcome.limits)
    if outcome.needs == "claim":
        return claim(snap)
    return snap


def append(valid: ValidEvent, *, context: TenantContext | None = None) -> str:
    """Log mode's ``record_fact`` without quotas: count ``valid`` at every level and append it. Returns the stream
    entry id. Raises ``DuplicateUsageEvent``, ``InactiveTenant``/``UnknownTenant``, ``LogStoreUnavailable``."""
    snap = snapshot(valid.tenant_id)
    change = Change(feature=valid.feature_name, used_delta=valid.units, used_at=valid.timestamp)
    admit_feature(snap, valid.feature_name)
    for _ in range(MAX_ATTEMPTS):
        outcome = attempt(snap, change, valid=valid)
        if outcome.admitted:
            return outcome.entry_id
        snap = repair(outcome)
    raise LogStoreUnavailable("the tree's log state kept changing; nothing was written")


def append_many(valids: Sequence[ValidEvent]) -> list[str | None]:
    """Log mode's batch write (``metering.bulk.record_many``): count and append every fact, **one script call per
    tree** (``lua/log_append_many.lua``): all of a tree's facts of the batch are appended, or none. Returns, per
    fact, its stream entry id, or ``None`` for a duplicate (its transaction id is in the de-duplication window).
    The batch must not repeat a (tenant, transaction id). Trees are written one after the other: should Redis fail
    at the second tree, the first one's facts stay appended (``LogStoreUnavailable``; re-sending the batch is safe:
    those come back as duplicates). Raises ``InactiveTenant``/``UnknownTenant``, ``LogStoreUnavailable``."""
    snaps = {valid.tenant_id: snapshot(valid.tenant_id) for valid in valids}
    by_tree: dict[int, list[int]] = {}
    for index, valid in enumerate(valids):
        by_tree.setdefault(snaps[valid.tenant_id].root_pk, []).append(index)
    for indexes in by_tree.values():
        for feature in sorted({valids[index].feature_name for index in indexes}):
            admit_feature(snaps[valids[indexes[0]].tenant_id], feature)
    results: list[str | None] = [None] * len(valids)
    for indexes in by_tree.values():
        _append_tree(valids, indexes, snaps, results)
    if metering_settings.LOG_DRAIN_EAGER:  # as for one append: the database reads as in commit mode
        for root_pk, indexes in by_tree.items():
            if any(results[index] for index in indexes):
                _drain_eagerly(root_pk)
    return results


def _append_tree(
    valids: Sequence[ValidEvent], indexes: list[int], snaps: dict[str, Snapshot], results: list[str | None]
) -> None:
    redis = _redis()
    tenants = sorted({valids[index].tenant_id for index in indexes})
    for _ in range(MAX_ATTEMPTS):
        tree = [snaps[tenant_id] for tenant_id in tenants]
        epochs = {snap.epoch for snap in tree}
        first = tree[0]
        if len(epochs) > 1 or any(snap.root_pk != first.root_pk for snap in tree):
            # Read at different moments (an epoch bump or a move in between): read them all again, together.
            snaps.update((tenant_id, snapshot(tenant_id, fresh=True)) for tenant_id in tenants)
            continue
        if first.epoch == counters.NOT_OURS:
            claim(first)
            snaps.update((tenant_id, snapshot(tenant_id, fresh=True)) for tenant_id in tenants)
            continue
        root, epoch = first.root_pk, first.epoch
        keys = [log.state_key(root), log.stream_key(root), log.listed_key(root)]
        args = [str(epoch), str(dedup_seconds()), str(log.LISTED_SECONDS), str(len(indexes))]
        now = utcnow()
        for index in indexes:
            valid = valids[index]
            snap = snaps[valid.tenant_id]
            lineage = [level.pk for level in snap.context.lineage]
            counter_keys = counters.keys_for_fact(lineage, valid.feature_name, valid.timestamp, epoch=epoch)
            fields = log.Entry(
                tenant_pk=snap.context.tenant.pk,
                path=snap.context.path,
                feature=valid.feature_name,
                units=valid.units,
                timestamp=valid.timestamp,
                transaction_id=valid.transaction_id,
                recorded_at=now,
                epoch=epoch,
                metadata=valid.metadata,
            ).encode()
            keys += [log.dedup_key(root, snap.context.tenant.pk, valid.transaction_id), *counter_keys]
            args += [str(len(counter_keys)), str(valid.units), str(len(fields)), *fields]
        try:
            answer = scripts.script(redis, "metering", "log_append_many")(keys=keys, args=args)
        except counters.RedisError as error:
            raise _unavailable(error) from None
        status = int(answer[0])
        if status == ADMITTED:
            if int(answer[1]):
                _list_tree(redis, root)
            for position, index in enumerate(indexes):
                kind, entry_id = int(answer[2 + 2 * position]), _text(answer[3 + 2 * position])
                results[index] = entry_id if kind == 1 else None
            return
        needs = "stale" if status == STALE else "state"
        outcome = Outcome(needs=needs, snapshot=first, redis_epoch=_text(answer[1]) if status == STALE else "")
        repair(outcome)
        snaps.update((tenant_id, snapshot(tenant_id, fresh=True)) for tenant_id in tenants)
    raise LogStoreUnavailable("the tree's log state kept changing; nothing of its batch was written")


def admit_feature(snap: Snapshot, feature: str) -> None:
    """``METERING["MAX_FEATURES_PER_TREE"]``: a feature this process knows for the tree costs nothing; else the
    database's rollups decide as in commit mode (facts not drained yet are not seen there: the bound may let a few
    more features in while the drain lags; it bounds abuse, it counts no money)."""
    from . import recorder

    using = metering_settings.DATABASE_ALIAS
    if (using, snap.root_pk, feature) in recorder._known_features:
        return
    with transaction.atomic(using=using):
        recorder.admit_features([(snap.root_pk, feature)], using)


def _list_tree(redis: Any, root_pk: int) -> None:
    """The tree's first append in ``LISTED_SECONDS``: put it in the drainer's work list (a second round trip,
    only then)."""
    try:
        redis.sadd(log.trees_key(), str(root_pk))
    except counters.RedisError as error:
        # The fact is appended; unlisted, the drainer would not see the tree: drop the flag so the next append lists
        # it again (and say so).
        logger.warning("log mode: could not list tree %s for the drainer: %s", root_pk, type(error).__name__)
        with contextlib.suppress(counters.RedisError):
            redis.delete(log.listed_key(root_pk))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stored_id(tenant_pk: int, transaction_id: str) -> int | None:
    """A duplicate's first fact, when the drainer has stored it (one query, on the duplicate's path only; ``None``
    while it waits in the stream, or when the database cannot answer: the refusal stands either way)."""
    try:
        rows = UsageRecord.objects.using(metering_settings.DATABASE_ALIAS).filter(
            tenant_id=tenant_pk, transaction_id=transaction_id
        )
        return rows.values_list("pk", flat=True).first()
    except DatabaseError as error:
        logger.warning("log mode: could not read a duplicate's stored fact: %s", type(error).__name__)
        return None


def _drain_eagerly(root_pk: int) -> None:
    """``LOG_DRAIN_EAGER`` (tests and development only, never production): persist the tree's stream right after
    the append, inside the caller's transaction (if any), so the database reads as in commit mode. No durability
    delay: the entry was just acknowledged by Redis, and a test's Redis is not the durability under test."""
    from . import drain

    try:
        drain.drain_tree(root_pk, using=metering_settings.DATABASE_ALIAS, delay=0.0, wait=True)
    except drain.LogUnavailable as error:
        # The fact is admitted and in the stream: a drain that Redis failed is the drainer's to redo, not the
        # caller's error (it would answer a 500 for a write that happened).
        logger.warning("log mode: the eager drain of tree %s failed; left to the drainer: %s", root_pk, error)


# ---- repairs: stale epoch, missing state, missing counters, unclaimed tree ----


def refresh(snap: Snapshot, redis_epoch: str) -> Snapshot:
    """Redis's state holds ``redis_epoch``, not ours: re-read from the database; if the database's epoch is not
    Redis's either (a push was lost, or is on its way), push it."""
    fresh = snapshot(snap.context.tenant_id, fresh=True)
    if fresh.epoch != counters.NOT_OURS and str(fresh.epoch) != redis_epoch:
        push_epoch(fresh.root_pk, fresh.epoch)
    return fresh


def reopen(snap: Snapshot) -> Snapshot:
    """Redis has no state for the tree: reopen its log (``drain.open_tree``), then read the epoch it committed."""
    from . import drain

    try:
        drain.open_tree(snap.root_pk, using=metering_settings.DATABASE_ALIAS)
    except counters.RedisError as error:
        raise _unavailable(error) from None
    except Tenant.DoesNotExist:
        # The snapshot's tree is gone (deleted, or its creation rolled back, and the id created again since): the
        # fresh read below finds the tenant's tree as it is now, or says it is unknown.
        pass
    return snapshot(snap.context.tenant_id, fresh=True)


def claim(snap: Snapshot) -> Snapshot:
    """The tree has no epoch of ours (its first write, or another owner's counters: ``counters.counter_owner``):
    claim it with a bump in a transaction of its own (pushed on commit), then read it again."""
    using = metering_settings.DATABASE_ALIAS
    try:
        with transaction.atomic(using=using):
            lock_trees([snap.root_pk], exclusive=True, using=using)
            if counters.current_epoch(snap.root_pk, using) == counters.NOT_OURS:
                counters.bump_epochs([snap.root_pk], using)
    except IntegrityError:
        pass  # the tree was deleted since the snapshot: the fresh read below says so (UnknownTenant)
    return snapshot(snap.context.tenant_id, fresh=True)


def push_epoch(root_pk: int, epoch: int) -> int:
    """Tell Redis the tree's epoch (compare-and-set against the retired ones, ``lua/log_epoch.lua``): 0 state
    missing, 1 done, 2 refused (an older read). Never raises: a push that does not land is redone by the first
    process that re-reads (at most ``LOG_REFRESH_SECONDS`` later)."""
    redis = counters.client()
    if redis is None or epoch == counters.NOT_OURS:
        return 0
    ttl = int(metering_settings.COUNTER_TTL_SECONDS) + 60
    try:
        return int(
            scripts.script(redis, "metering", "log_epoch")(
                keys=[log.state_key(root_pk), log.retired_key(root_pk)], args=[str(epoch), str(ttl)]
            )
        )
    except counters.RedisError as error:
        counters.note_unreachable()
        logger.warning("log mode: could not push tree %s's new epoch: %s", root_pk, type(error).__name__)
        return 0


def push_epochs(root_pks: Iterable[int]) -> None:
    """After a commit that bumped these trees' epochs: push what the database now holds (a fresh read, so a later
    bump is never overwritten by this one's older value). This process forgets its snapshots at once."""
    forget_snapshots()
    using = metering_settings.DATABASE_ALIAS
    for root_pk in sorted(set(root_pks)):
        try:
            epoch = counters.current_epoch(root_pk, using)
        except Exception as error:  # the database failed right after the commit: the refresh bound applies
            logger.warning("log mode: could not read tree %s's epoch to push it: %s", root_pk, type(error).__name__)
            continue
        push_epoch(root_pk, epoch)


def rebuild(snap: Snapshot, feature: str, limits: Sequence[Limit]) -> Snapshot:
    """Create the limits' missing counters (used and reserved) as the database's sums plus the stream's entries not
    persisted yet, exactly (see the module). Returns the snapshot to retry with."""
    wanted: list[tuple[str, int, str, str, datetime | None, datetime | None]] = []
    for limit in limits:
        used_key, reserved_key = counter_keys(snap, feature, limit, snap.epoch)
        wanted.append((used_key, limit.tenant_pk, limit.level_path, counters.USED, limit.start, limit.end))
        wanted.append((reserved_key, limit.tenant_pk, limit.level_path, counters.RESERVED, limit.start, limit.end))
    answer = rebuild_counters(snap.root_pk, snap.epoch, feature, wanted)
    if answer == STATE_MISSING:
        return reopen(snap)
    if answer == STALE:
        return snapshot(snap.context.tenant_id, fresh=True)
    return snap


def rebuild_counters(
    root_pk: int,
    epoch: int,
    feature: str,
    wanted: Sequence[tuple[str, int, str, str, datetime | None, datetime | None]],
) -> int:
    """Create the counters ``wanted`` (key, level pk, level path, kind, window start, window end) under ``epoch``.
    Returns ``ADMITTED`` (done), ``STALE`` (the tree's epoch is another now) or ``STATE_MISSING``. Usage counters
    get the stream's entries after the drain cursor; reserved ones are the database's alone (reservations are
    database rows, written under the tree lock this takes exclusively)."""
    from . import drain

    redis = _redis()
    using = metering_settings.DATABASE_ALIAS
    stream = log.stream_key(root_pk)
    ttl = int(metering_settings.COUNTER_TTL_SECONDS)
    with transaction.atomic(using=using):
        lock_trees([root_pk], exclusive=True, using=using)
        last_entry = drain.drain_locked(root_pk, using=using)
        if counters.current_epoch(root_pk, using) != epoch:
            return STALE
        keys = [log.state_key(root_pk), stream]
        args = [str(epoch), last_entry, str(ttl), ""]
        expected = counters.expected_units
        for name, level_pk, level_path, kind, start, end in wanted:
            units = expected(kind, level_pk, level_path, feature, start, end, using)
            keys.append(name)
            args += [
                str(units),
                str(level_pk) if kind == counters.USED else "",
                feature,
                "" if start is None else str(log.micros(start)),
                "" if end is None else str(log.micros(end)),
            ]
        try:
            # The deadline: this server's clock now plus the client's socket timeout (see log_rebuild.lua).
            seconds, microseconds = redis.time()
            args[3] = str(int(seconds) * 1_000_000 + int(microseconds) + int(_socket_timeout(redis) * 1_000_000))
            answer = scripts.script(redis, "metering", "log_rebuild")(keys=keys, args=args)
        except counters.RedisError as error:
            raise _unavailable(error) from None
    status = int(answer[0])
    if status == 0:
        return STATE_MISSING
    if status in (1, 3):
        return STALE
    return ADMITTED


def _socket_timeout(redis: Any) -> float:
    """The client's socket timeout (how long it waits for an answer before giving up); 1 s when it has none."""
    timeout = redis.connection_pool.connection_kwargs.get("socket_timeout")
    return float(timeout) if timeout else 1.0


def rebuild_one(root_pk: int, tenant_pk: int, feature: str, period: Period, start: datetime | None) -> int | None:
    """``counters.read``'s rebuild in log mode: one usage counter, under the epoch Redis's state holds for the tree
    (``None``: it could not be rebuilt now; the database answers)."""
    redis = _redis()
    try:
        state_epoch = redis.hget(log.state_key(root_pk), "epoch")
    except counters.RedisError as error:
        raise _unavailable(error) from None
    if state_epoch is None:
        return None
    epoch = int(state_epoch)
    path = Tenant.objects.using(metering_settings.DATABASE_ALIAS).filter(pk=tenant_pk).values_list("path", flat=True)
    level_path = path.first() or ""
    end = window(period, start)[1] if start is not None else None
    name = counters.key(root_pk, tenant_pk, feature, period, start, epoch=epoch)
    if (
        rebuild_counters(root_pk, epoch, feature, [(name, tenant_pk, level_path, counters.USED, start, end)])
        != ADMITTED
    ):
        return None
    value = redis.get(name)
    return None if value is None else int(value)


# ---- changes that must be seen at once: bump the tree's epoch (pushed on commit) ----

_before: dict[int, tuple[bool, bool]] = {}


@receiver(pre_save, sender=Tenant, dispatch_uid="xaas_metering_log_tenant_before")
def _tenant_before(sender: type[Tenant], instance: Tenant, **kwargs: Any) -> None:
    if not log.is_log_mode() or instance.pk is None:
        return
    using = kwargs.get("using") or "default"
    row = Tenant.objects.using(using).filter(pk=instance.pk).values_list("is_active", "exempt").first()
    if row is not None:
        _before[id(instance)] = (bool(row[0]), bool(row[1]))


@receiver(post_save, sender=Tenant, dispatch_uid="xaas_metering_log_tenant_after")
def _tenant_after(sender: type[Tenant], instance: Tenant, created: bool, **kwargs: Any) -> None:
    """A tenant deactivated, reactivated, exempted or no longer exempt changes what a write may do for its whole
    subtree: in log mode, bump its tree's epoch in the change's transaction (pushed on commit), so no process keeps
    writing with its cached lineage (see the module)."""
    before = _before.pop(id(instance), None)
    if created or before is None or before == (bool(instance.is_active), bool(instance.exempt)):
        return
    root_pk = int(instance.path.strip("/").split("/")[0]) if instance.path else instance.pk
    counters.bump_epochs([root_pk], kwargs.get("using") or "default")


@receiver(post_delete, sender=Tenant, dispatch_uid="xaas_metering_log_tenant_deleted")
def _tenant_deleted(sender: type[Tenant], instance: Tenant, **kwargs: Any) -> None:
    """A deleted tenant must not be written for from a cached snapshot either: a tenant below the root bumps its
    tree's epoch; a deleted root (its epoch row goes with it) has a fresh random epoch pushed, which no process
    holds, so every one of them re-reads (and finds no tenant)."""
    if not log.is_log_mode() or not instance.path:
        return
    using = kwargs.get("using") or "default"
    root_pk = int(instance.path.strip("/").split("/")[0])
    if root_pk != instance.pk:
        if Tenant.objects.using(using).filter(pk=root_pk).exists():
            counters.bump_epochs([root_pk], using)
        return

    def retire() -> None:
        forget_snapshots()
        push_epoch(root_pk, secrets.randbits(62) + 1)

    transaction.on_commit(retire, using=using)
