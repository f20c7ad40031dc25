"""Hot usage counters in Redis: a cache of the rollups that is exact, and rebuilt from the database when lost.

Each counter is the units of one tenant's subtree for one feature in one window (hour, day, month, total), under
the key ``xaas:<label>:{<site>.t<root pk>}:e<epoch>:u:<tenant pk>:<feature>:<period>:<window start>``. The
``{<site>.t<root>}`` hash tag puts a whole tree in one Redis Cluster slot, so one script may touch every level of a
lineage; ``<site>`` (and the readable ``<label>``) is this site's namespace (``tenants.namespace``: the cache's
``KEY_PREFIX`` and the usage database's identity), so sites sharing one Redis never see each other's counters.
Values are decimal strings added and compared exactly by the Lua scripts (``lua/bignum.lua``), at any size.

Why it stays exact:
- a writer adds to the counters that *exist*, inside its database transaction and while holding its tree's lock
  shared (``tenants.locks``), as the last step before commit;
- a counter is only ever *created* by a rebuild, which takes the tree's lock exclusively, so it waits for every
  in-flight writer, then sums the committed rollups and sets the value. No writer can be counted twice or missed;
- losing Redis (flush, restart, eviction, TTL) only means the next read rebuilds;
- a write or decision that Redis did *not* see (Redis unreachable, a subtree moved, rollups repaired) bumps the
  tree's **epoch** (``CounterEpoch``) in its own transaction. The epoch is part of every key, and the hot path reads
  it in the statement that stores the fact, so from that commit on every reader and decider uses keys that do not
  exist yet and rebuilds them: counters from before an outage are never used again, even when Redis comes back with
  its old data. Old generations expire with their TTL.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import Error, connections, transaction

from tenants import namespace
from tenants.locks import lock_trees

from . import rollups, scripts
from .breaker import log_level
from .conf import metering_settings
from .models import CounterEpoch
from .windows import WINDOWED_PERIODS, Period, window

logger = logging.getLogger("metering.counters")

try:  # django-redis is a dependency, but the counters must degrade to "off", never break imports.
    from django_redis import get_redis_connection
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover
    get_redis_connection = None

    class RedisError(Exception):  # type: ignore[no-redef]
        pass


def client() -> Any | None:
    """The Redis client behind the metering cache alias, or ``None`` when that cache is not django-redis."""
    if get_redis_connection is None:
        return None
    try:
        return get_redis_connection(metering_settings.CACHE_ALIAS)
    except (NotImplementedError, AttributeError, KeyError):
        return None


UNREACHABLE_MEMORY_SECONDS = 1.0
_unreachable_at = -UNREACHABLE_MEMORY_SECONDS


def note_unreachable() -> None:
    """A Redis call of this process just failed (the quota paths then start on the database for a moment)."""
    global _unreachable_at
    _unreachable_at = time.monotonic()


def recently_unreachable() -> bool:
    """Whether a Redis call of this process failed within the last second."""
    return time.monotonic() - _unreachable_at < UNREACHABLE_MEMORY_SECONDS


def unreachable_since(moment: float) -> bool:
    """Whether a Redis call of this process failed at or after ``moment`` (``time.monotonic()``)."""
    return _unreachable_at >= moment


def tree_tag(root_pk: int) -> str:
    """The start of every counter key of the tree, in this site's namespace (see ``tenants.namespace``)."""
    return namespace.current().tree_tag(root_pk)


USED = "u"
RESERVED = "r"  # quota held by open reservations (``quotas``), kept apart so usage reads never include it


def key(
    root_pk: int,
    tenant_pk: int,
    feature: str,
    period: Period,
    start: datetime | None,
    kind: str = USED,
    *,
    epoch: int,
) -> str:
    if epoch == NOT_OURS:
        raise CountersNotOurs(f"the counters of tree {root_pk} belong to another owner")
    window_id = "all" if start is None else str(int(start.timestamp()))
    return f"{tree_tag(root_pk)}:e{epoch}:{kind}:{tenant_pk}:{feature}:{period}:{window_id}"


def keys_for_fact(
    lineage_pks: Sequence[int], feature: str, timestamp: datetime, kind: str = USED, *, epoch: int
) -> list[str]:
    """Every counter a fact at ``timestamp`` adds to: each level x (hour, day, month, total)."""
    root = lineage_pks[0]
    starts: list[tuple[Period, datetime | None]] = [
        (period, window(period, timestamp)[0]) for period in WINDOWED_PERIODS
    ]
    starts.append(("total", None))
    return [key(root, pk, feature, period, start, kind, epoch=epoch) for pk in lineage_pks for period, start in starts]


def increment_existing(redis: Any, keys: list[str], units: int) -> None:
    scripts.script(redis, "metering", "increment")(keys=keys, args=[str(units)])


# ---- the tree's counter epoch ----


def _epoch_table(using: str) -> str:
    return connections[using].ops.quote_name(CounterEpoch._meta.db_table)


NOT_OURS = -1
"""The epoch a statement reads when the tree's counters are not this process's to use (``counter_owner``)."""


class CountersNotOurs(RedisError):
    """A counter key was asked for under ``NOT_OURS``: treated as Redis being unavailable (the database decides)."""


def counter_owner() -> str:
    """Who may use a tree's live counters: this site's namespace (``tenants.namespace``), or ``<hash>/db`` for a
    process without Redis counters.

    Each tree's epoch row records the owner whose counters follow every write. A process of another owner — the
    same site with another ``KEY_PREFIX`` during a rolling deploy, or one configured without Redis — writes facts
    those counters do not see, so it reads ``NOT_OURS`` and *claims* the tree first: its write or decision bumps the
    epoch and sets itself as the owner in its own transaction (deciding on the database, with the tree locked
    exclusively), which retires the other owner's counters as of that commit. Two owners taking turns cost a
    rebuild per turn, never a unit counted by one and missed by the other."""
    site = namespace.current().hash
    return site if client() is not None else f"{site}/db"


def epoch_subquery(root_pk: int, using: str) -> tuple[str, list[Any]]:
    """SQL of the tree's current epoch, to read within a statement the hot path sends anyway: ``NOT_OURS`` when
    another owner (``counter_owner``) holds the tree's counters, or when the tree has no epoch row yet."""
    sql = (
        f"COALESCE((SELECT CASE WHEN owner = %s THEN epoch ELSE {NOT_OURS} END "  # noqa: S608 (our table)
        f"FROM {_epoch_table(using)} WHERE root_id = %s), {NOT_OURS})"
    )
    return sql, [counter_owner(), root_pk]


def current_epoch(root_pk: int, using: str) -> int:
    """The tree's current epoch (one primary-key lookup)."""
    sql, params = epoch_subquery(root_pk, using)
    with connections[using].cursor() as cursor:
        cursor.execute(f"SELECT {sql}", params)
        return int(cursor.fetchone()[0])


def bump_epoch_statement(root_pk: int, using: str) -> tuple[str, list[Any]]:
    """A fresh *random* epoch, not the next number: a bump that rolls back (in a caller's transaction, say) must
    never hand its number to a later bump, whose keys Redis may already hold from a rebuild inside that
    transaction."""
    table = _epoch_table(using)
    sql = (
        f"INSERT INTO {table} (root_id, epoch, owner) VALUES (%s, %s, %s) "  # noqa: S608 (our table)
        f"ON CONFLICT (root_id) DO UPDATE SET epoch = excluded.epoch, owner = excluded.owner"
    )
    return sql, [root_pk, secrets.randbits(62) + 1, counter_owner()]


def bump_epochs(root_pks: Iterable[int], using: str) -> None:
    """Retire the trees' counters as of this transaction's commit: after it, every decision rebuilds them.

    Call inside the transaction of the write Redis did not see (it commits or rolls back with it)."""
    root_pks = sorted(set(root_pks))
    with connections[using].cursor() as cursor:
        for root_pk in root_pks:
            cursor.execute(*bump_epoch_statement(root_pk, using))
    if root_pks and _log_mode():
        # Log mode: writers validate their cached epoch against Redis's state of the tree, so the new one must reach
        # it on commit (``metering.appender``).
        from . import appender

        transaction.on_commit(lambda: appender.push_epochs(root_pks), using=using)


def _log_mode() -> bool:
    from . import log

    return log.is_log_mode()


def read(
    root_pk: int, tenant_pk: int, feature: str, period: Period, start: datetime | None, end: datetime | None
) -> int | None:
    """The counter's units, rebuilt from the database if Redis lost it; ``None`` when Redis is off or down."""
    redis = client()
    if redis is None:
        return None
    using = metering_settings.DATABASE_ALIAS
    try:
        epoch = current_epoch(root_pk, using)
        if epoch == NOT_OURS:
            return None  # another owner's counters (see ``counter_owner``): the database answers
        value = redis.get(key(root_pk, tenant_pk, feature, period, start, epoch=epoch))
        if value is not None:
            return int(value)
        return rebuild(redis, root_pk, tenant_pk, feature, period, start, end)
    except RedisError as error:
        note_unreachable()
        logger.log(
            log_level(error), "usage counter unavailable, reading the database instead: %s", type(error).__name__
        )
        return None


def rebuild(
    redis: Any,
    root_pk: int,
    tenant_pk: int,
    feature: str,
    period: Period,
    start: datetime | None,
    end: datetime | None,
) -> int:
    """Set the counter from the committed rollups, with the tree locked exclusively (no writer in flight), under the
    epoch read with that lock held. Log mode: the rollups lag the stream, so ``appender.rebuild_one`` adds the
    entries not drained yet."""
    if _log_mode():
        from . import appender

        rebuilt = appender.rebuild_one(root_pk, tenant_pk, feature, period, start)
        return (
            rollups.sum_units(tenant_pk, feature, start, end, using=metering_settings.DATABASE_ALIAS)
            if rebuilt is None
            else rebuilt
        )
    using = metering_settings.DATABASE_ALIAS
    failed: RedisError | None = None
    with transaction.atomic(using=using):
        lock_trees([root_pk], exclusive=True, using=using)
        epoch = current_epoch(root_pk, using)
        units = rollups.sum_units(tenant_pk, feature, start, end, using=using)
        if epoch == NOT_OURS:
            return units  # another owner's counters: nothing of ours to set
        counter = key(root_pk, tenant_pk, feature, period, start, epoch=epoch)
        try:
            # NX: a counter that exists is newer than this sum (rebuilt and counted since), never older.
            redis.set(counter, str(units), ex=int(metering_settings.COUNTER_TTL_SECONDS), nx=True)
        except RedisError as error:
            # The SET may still land after the lock is released, with a sum that misses later facts: retire the
            # epoch it would land in, in this transaction, before anyone else can decide.
            note_unreachable()
            bump_epochs([root_pk], using)
            failed = error
    if failed is not None:
        raise failed
    return units


class DropIfCommitFails:
    """Around a transaction that changes a tree's counters before its COMMIT: if the block fails after
    ``counted()`` (the COMMIT itself, or its outcome unknown), the tree's counters cannot be trusted: drop them, so
    the next reader rebuilds them from the database."""

    def __init__(self, root_pk: int) -> None:
        self.root_pk = root_pk
        self._counted = False

    def counted(self) -> None:
        self._counted = True

    def is_counted(self) -> bool:
        return self._counted

    def __enter__(self) -> DropIfCommitFails:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if kind is not None and self._counted:
            forget_trees([self.root_pk])


def forget_trees(root_pks: Iterable[int]) -> None:
    """After a transaction that counted in Redis (or may still, a late command) failed: its counters must not be
    trusted. Bump the trees' epochs in a transaction of their own; should the database refuse, drop the counters
    instead (either suffices)."""
    root_pks = sorted(set(root_pks))
    using = metering_settings.DATABASE_ALIAS
    try:
        with transaction.atomic(using=using):
            bump_epochs(root_pks, using)
    except Error as error:  # the database is in trouble too (a failed COMMIT, say)
        logger.error("could not bump the counter epoch of trees %s: %s", root_pks, type(error).__name__)
        drop_trees(root_pks)


def drop_trees(root_pks: Iterable[int]) -> None:
    """Forget every counter of these trees (after a move, or a write Redis did not see); log mode's keys stay."""
    redis = client()
    if redis is None:
        return
    try:
        for root_pk in root_pks:
            # Counter keys only (``key``: ``<tag>:e<epoch>:...``): log mode's stream, state, de-duplication and
            # give-back keys share the tag, and deleting them would lose admitted facts not drained yet.
            batch = list(redis.scan_iter(match=f"{tree_tag(root_pk)}:e*", count=1000))
            for offset in range(0, len(batch), 500):
                redis.delete(*batch[offset : offset + 500])
    except RedisError as error:
        logger.error("could not drop usage counters of trees %s: %s", sorted(root_pks), type(error).__name__)


# ---- reconciliation: the live counters against the database ----


@dataclass(frozen=True, slots=True)
class CounterDrift:
    """A live counter whose value is not what the database says (``kind``: ``u`` usage, ``r`` reserved)."""

    key: str
    kind: str
    tenant_pk: int
    feature: str
    period: Period
    window_start: datetime | None
    stored_units: int
    expected_units: int


def parse_key(counter: str) -> tuple[int, str, int, str, Period, datetime | None] | None:
    """``(epoch, kind, tenant pk, feature, period, window start)`` of a counter key of this site; ``None`` if it is
    not one (another site's keys included). Feature names may contain ``:``, so the key is read from both ends."""
    match = _KEY_RE.fullmatch(counter)
    if match is None or match["site"] != namespace.current().tree_tag(int(match["root"])):
        return None
    parts = match["rest"].split(":")
    if len(parts) < 6 or not parts[0].startswith("e"):
        return None
    try:
        epoch, tenant_pk = int(parts[0][1:]), int(parts[2])
    except ValueError:
        return None
    period, window_id = parts[-2], parts[-1]
    if period not in (*WINDOWED_PERIODS, "total"):
        return None
    try:
        start = None if window_id == "all" else datetime.fromtimestamp(int(window_id), UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return epoch, parts[1], tenant_pk, ":".join(parts[3:-2]), period, start


_KEY_RE = re.compile(r"(?P<site>xaas:[A-Za-z0-9._-]+:\{[0-9a-f]+\.t(?P<root>[0-9]+)\}):(?P<rest>.+)", re.DOTALL)


# What each kind of counter should hold: ``(tenant pk, tenant path, feature, start, end) -> units`` from the database.
# Usage counters are the rollups; other apps register theirs (``quotas`` its reserved counters), this app knowing
# nothing of them.
ExpectedUnits = Callable[[int, str, str, datetime | None, datetime | None, str], int]
_expected: dict[str, ExpectedUnits] = {
    USED: lambda tenant_pk, path, feature, start, end, using: rollups.sum_units(
        tenant_pk, feature, start, end, using=using
    )
}


def expected_units(
    kind: str, tenant_pk: int, path: str, feature: str, start: datetime | None, end: datetime | None, using: str
) -> int:
    """What a counter of ``kind`` should hold according to the database (usage: the rollups; others: their app's)."""
    return _expected[kind](tenant_pk, path, feature, start, end, using)


def register_kind(kind: str, expected: ExpectedUnits) -> None:
    """Let ``compare_live`` check counters of ``kind`` against what ``expected`` reads from the database."""
    _expected[kind] = expected


def compare_live(root_pk: int, *, repair: bool, using: str) -> list[CounterDrift]:
    """Every live counter of the tree's current epoch (usage, and each registered kind) against the database, with
    the tree locked exclusively (no writer in flight, so both sides are the same instant). ``repair``: when any
    differs, bump the epoch in that transaction, so every counter of the tree is rebuilt from the database before
    it is used again. Redis off: nothing to compare."""
    redis = client()
    if redis is None:
        return []
    from tenants.models import Tenant

    drift: list[CounterDrift] = []
    with transaction.atomic(using=using):
        lock_trees([root_pk], exclusive=True, using=using)
        epoch = current_epoch(root_pk, using)
        if epoch == NOT_OURS:
            return []  # no live counters of ours (another owner's: see ``counter_owner``)
        prefix = f"{tree_tag(root_pk)}:e{epoch}:"
        names = sorted(name.decode() for name in redis.scan_iter(match=prefix + "*", count=1000))
        paths = dict(
            Tenant.objects.using(using).filter(path__startswith=f"/{root_pk}/").values_list("pk", "path").iterator()
        )
        for offset in range(0, len(names), 500):
            chunk = names[offset : offset + 500]
            for name, value in zip(chunk, redis.mget(chunk), strict=True):
                parsed = parse_key(name)
                if value is None or parsed is None or parsed[1] not in _expected or parsed[2] not in paths:
                    continue  # expired meanwhile, not ours, or of a tenant that left the tree
                _, kind, tenant_pk, feature, period, start = parsed
                end = window(period, start)[1] if start is not None else None
                expected = _expected[kind](tenant_pk, paths[tenant_pk], feature, start, end, using)
                if int(value) != expected:
                    drift.append(CounterDrift(name, kind, tenant_pk, feature, period, start, int(value), expected))
        if repair and drift:
            bump_epochs([root_pk], using)
    return drift
