"""Log mode: where a logged fact is written. The drainer takes facts out of the trees' Redis streams into the database.

In ``METERING["WRITE_MODE"] = "log"`` a request only appends its fact to its tree's stream (``metering.log``). This
module persists the streams in batches, one database transaction per batch of up to ``LOG_DRAIN_BATCH`` entries:

1. lock the tree's ``LogCursor`` row (``FOR UPDATE SKIP LOCKED``: a tree another drainer holds is skipped; on SQLite
   ``IMMEDIATE`` transactions serialize drainers instead), created when missing;
2. read the entries after ``last_entry`` that are old enough to be durable in Redis (``LOG_DRAIN_DELAY_SECONDS``);
3. insert their facts with one multi-row ``INSERT ... ON CONFLICT (tenant_id, transaction_id) DO NOTHING
   RETURNING`` (idempotent: a batch redone after a crash inserts nothing twice);
4. roll up only the inserted facts, each by its tenant's lineage *at drain time* (a move since admission is
   followed), one upsert per tenant x feature x hour (``rollups.add_many``); write the sinks' outbox rows
   (``on_stored_many`` of the adapter); advance the cursor; COMMIT;
5. after the commit, delete the persisted entries from the stream (``XTRIM MINID`` just past the committed cursor:
   every entry up to it, never one past it; leftovers of a drainer that died between its commit and its trim go
   with the next trim) and send ``usage_recorded`` per inserted fact. **In log mode ``usage_recorded`` fires
   at drain time**, not when the request was admitted.

Entries that do not become facts are given back to the live counters, which counted them at admission, so
counters == facts: a *duplicate* (the database already had the transaction id, used before and outside the Redis
de-duplication window; or twice in one batch) and a *dead* entry (undecodable, invalid, or its tenant no longer
exists: kept as a ``LogDeadEntry`` row for the operator, never blocking the stream). The give-back runs *before*
COMMIT, while the cursor row is locked (so no counter rebuild, which takes that lock through ``drain_locked``, can
run in between), and each entry is given back at most once (a marker key per entry in the same Lua call). Should
the COMMIT then fail, the entry is drained again but not given back twice; a rebuild in between may count it once
more from the stream: at worst an over-count, which refuses more (never lets usage overshoot) and heals with the
counters' TTL or the next rebuild.

Durability ordering: the database must never get ahead of what Redis has durably, or a Redis crash would leave
facts persisted whose counters and stream entries are gone (and the cursor past ids a restarted Redis hands out
again). Redis 7.0 has no ``WAITAOF``; with ``appendfsync everysec`` an append is on disk within about a second, so
only entries whose stream id time is older than ``LOG_DRAIN_DELAY_SECONDS`` (default 2 s) by Redis's own ``TIME``
are drained. With ``appendfsync always`` every append is on disk before the writer got its answer: no delay. The
policy is read with ``CONFIG GET`` once per drain cycle (refused, as on managed Redis: the 2 s default).
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db import connections, transaction
from django.utils import timezone

from tenants.context import TenantContext, TenantRef
from tenants.locks import lock_trees
from tenants.models import Tenant

from . import counters, log, rollups, scripts
from .bulk import StoredFact, insert_facts
from .conf import metering_settings
from .events import ValidEvent
from .exceptions import MeteringError, UsageTotalOutOfRange
from .models import LogCursor, LogDeadEntry, LogGap, UsageRecord
from .signals import facts_drained, usage_recorded
from .windows import floor_hour

logger = logging.getLogger("metering.drain")

DEFAULT_DELAY_SECONDS = 2.0
GIVEBACK_TTL_SECONDS = 86_400  # a failed batch is redone within minutes; a day is far beyond any retry
MAX_FEATURE_LENGTH = UsageRecord._meta.get_field("feature").max_length or 100
MAX_TRANSACTION_ID_LENGTH = UsageRecord._meta.get_field("transaction_id").max_length or 128
MAX_UNITS = 2**63 - 1  # the fact's column is a bigint
OPEN_RECHECK = (0.01, 0.02, 0.05)  # seconds: another opener's state HSET follows its commit within milliseconds


class LogUnavailable(MeteringError):
    """Log mode needs the metering cache to be django-redis (and Redis reachable) to drain or open a tree."""


@dataclass
class DrainReport:
    trees: int = 0  # trees drained (at least looked at under their cursor lock)
    batches: int = 0  # transactions committed
    entries: int = 0  # stream entries persisted (facts + duplicates + dead)
    facts: int = 0  # facts inserted
    duplicates: int = 0
    dead: int = 0
    skipped: int = 0  # trees held by another drainer
    waiting: int = 0  # entries left in streams, too young to be durable or beyond the bound of this run
    gaps: int = 0  # LogGap rows written
    more: bool = False  # stopped by a bound (max_batches, budget, stop) while a full batch was just read
    seconds: float = 0.0
    unlisted: list[int] = field(default_factory=list)

    def add(self, other: DrainReport) -> None:
        for name in ("trees", "batches", "entries", "facts", "duplicates", "dead", "skipped", "waiting", "gaps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds += other.seconds
        self.unlisted += other.unlisted
        self.more = self.more or other.more

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _redis() -> Any:
    redis = counters.client()
    if redis is None:
        raise LogUnavailable("log mode needs the metering cache (METERING['CACHE_ALIAS']) to be django-redis")
    return redis


def _using(using: str | None) -> str:
    return using or str(metering_settings.DATABASE_ALIAS)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _next_id(value: str) -> str:
    """The stream id right after ``value`` (sequence numbers end at 2**64 - 1)."""
    ms, seq = _id(value)
    return f"{ms + 1}-0" if seq == 2**64 - 1 else f"{ms}-{seq + 1}"


# ---- the durability delay ----


def fsync_policy(redis: Any) -> str | None:
    """The server's ``appendonly``/``appendfsync`` as one word: ``"off"`` (no AOF), ``"always"``, ``"everysec"``,
    ``"no"``; ``None`` when ``CONFIG GET`` is refused (managed Redis) or fails."""
    try:
        config = {_text(k): _text(v) for k, v in redis.config_get("append*").items()}
    except Exception:  # a renamed/disabled CONFIG answers an error; the caller falls back to the default delay
        return None
    if config.get("appendonly", "").lower() != "yes":
        return "off"
    return config.get("appendfsync", "").lower() or None


def drain_delay(redis: Any) -> float:
    """How old (by Redis's clock) an entry must be before it is drained: ``LOG_DRAIN_DELAY_SECONDS`` when set,
    else 0 under ``appendfsync always`` and 2 s otherwise (everysec; also when the policy cannot be read)."""
    configured = metering_settings.LOG_DRAIN_DELAY_SECONDS
    if configured is not None:
        return float(configured)
    return 0.0 if fsync_policy(redis) == "always" else DEFAULT_DELAY_SECONDS


# ---- the cursor ----


def _cursor(root_pk: int, using: str, *, skip_locked: bool) -> LogCursor | None:
    """The tree's cursor row, locked until the transaction ends (created when missing); ``None``: another drainer
    holds it (only with ``skip_locked``), or the tree's root no longer exists (logged)."""
    rows = LogCursor.objects.using(using)
    found = rows.select_for_update(skip_locked=skip_locked).filter(root_id=root_pk).first()
    if found is not None or (skip_locked and rows.filter(root_id=root_pk).exists()):
        return found
    if not Tenant.objects.using(using).filter(pk=root_pk).exists():
        logger.error("log mode: tree %s has a stream but its root tenant no longer exists; left in Redis", root_pk)
        return None
    LogCursor.objects.using(using).bulk_create([LogCursor(root_id=root_pk)], ignore_conflicts=True)
    return rows.select_for_update(skip_locked=skip_locked).filter(root_id=root_pk).first()


def _pairs(fields: Any) -> dict[Any, Any]:
    """XRANGE's fields from a script: a flat [name, value, ...] list (redis-py's own XRANGE gives a dict)."""
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=True))


def drain_locked(root_pk: int, *, using: str | None = None) -> str:
    """Inside the caller's transaction: lock the tree's cursor row ``FOR UPDATE`` (waiting for a drainer's batch to
    commit, never skipping) and return ``last_entry``. The database's sums are then exactly the stream's entries up
    to that id, and no batch commits until the caller's transaction ends (the counter rebuild adds the stream's
    entries after it)."""
    using = _using(using)
    cursor = _cursor(root_pk, using, skip_locked=False)
    if cursor is None:
        raise Tenant.DoesNotExist(f"tree {root_pk} does not exist")
    return cursor.last_entry


# ---- opening a tree's log ----


def _state(redis: Any, root_pk: int) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in redis.hgetall(log.state_key(root_pk)).items()}


def _stream_last_id(redis: Any, root_pk: int) -> str | None:
    """The stream's last-generated id (``XINFO STREAM``), ``None`` when the stream does not exist."""
    try:
        info = redis.xinfo_stream(log.stream_key(root_pk))
    except Exception as error:  # "no such key"
        if "no such key" in str(error).lower():
            return None
        raise
    return _text(info["last-generated-id"])


def _move_stream_past(redis: Any, root_pk: int, last_entry: str) -> None:
    """Make the stream's next ids greater than ``last_entry`` (a stream restored older, or a new one), so ids the
    database has seen are never handed out again."""
    key = log.stream_key(root_pk)
    current = _stream_last_id(redis, root_pk)
    if current is not None and _id(current) >= _id(last_entry):
        return
    if current is None:
        # XADD of a placeholder trimmed at once (MAXLEN 0): the stream exists, empty, its last id past the cursor.
        redis.execute_command("XADD", key, "MAXLEN", "0", _next_id(last_entry), "_", "")
    else:
        redis.execute_command("XSETID", key, last_entry)


def _set_state(redis: Any, root_pk: int, generation: str, epoch: int, expected: str | None) -> None:
    """HSET the tree's state unless another opener already replaced the one seen under the lock."""
    scripts.script(redis, "metering", "log_set_state")(
        keys=[log.state_key(root_pk)], args=[expected or "", generation, str(epoch)]
    )


def open_tree(root_pk: int, *, using: str | None = None) -> str:
    """The tree's log generation, (re)opening the log when Redis lacks its state (called by the writer when its
    script answers that the state hash is missing, and by the drainer).

    Under the cursor row lock: Redis's ``gen`` == the cursor's: returned as is. Otherwise, if the cursor had a
    generation (entries were expected), a ``LogGap`` is written and an ERROR logged naming the interval that may
    be missing; a fresh random generation is created, the tree's counter epoch is bumped (counters are rebuilt),
    the cursor restarts at ``0-0`` (entries still in the stream are drained again: their facts are idempotent),
    and after the commit the stream is moved past every id seen and the state hash set to {gen, epoch}."""
    using = _using(using)
    redis = _redis()
    report = DrainReport()
    with transaction.atomic(using=using):
        cursor = _cursor(root_pk, using, skip_locked=False)
        if cursor is None:
            raise Tenant.DoesNotExist(f"tree {root_pk} does not exist")
        state = _state(redis, root_pk)
        if not state and cursor.generation:
            for pause in OPEN_RECHECK:  # another opener committed first and is about to HSET its state
                time.sleep(pause)
                state = _state(redis, root_pk)
                if state:
                    break
        if cursor.generation and state.get("gen") == cursor.generation:
            return cursor.generation
        generation, epoch, old_last = _reopen(cursor, state, using, report)
    _after_open(redis, root_pk, old_last, generation, epoch, state.get("gen"))
    return generation


def _reopen(cursor: LogCursor, state: dict[str, str], using: str, report: DrainReport) -> tuple[str, int, str]:
    """Inside the cursor's transaction: a new generation, the gap noted, the epoch bumped. Returns (generation,
    epoch, the old last entry)."""
    root_pk = cursor.root_id
    old_last = cursor.last_entry
    if cursor.generation:
        found = f"generation {state['gen']!r}" if state.get("gen") else "no log state"
        note = (
            f"Redis holds {found} for this tree, the database expected generation {cursor.generation!r}: facts "
            f"admitted after entry {old_last} (drained until {cursor.last_drained_at or 'never'}) and not yet "
            "persisted may be missing; the tree's counters are rebuilt from the database."
        )
        LogGap.objects.using(using).create(
            root_id=root_pk,
            generation=cursor.generation,
            after_entry=old_last,
            last_drained_at=cursor.last_drained_at,
            note=note,
        )
        report.gaps += 1
        logger.error(
            "log mode: tree %s lost its Redis log: facts after entry %s of generation %s (last drained %s) may be "
            "missing (%s)",
            root_pk,
            old_last,
            cursor.generation,
            cursor.last_drained_at,
            found,
        )
    counters.bump_epochs([root_pk], using)
    epoch = counters.current_epoch(root_pk, using)
    cursor.generation = secrets.token_hex(16)
    cursor.last_entry = "0-0"
    cursor.save(using=using, update_fields=["generation", "last_entry"])
    return cursor.generation, epoch, old_last


def _after_open(redis: Any, root_pk: int, old_last: str, generation: str, epoch: int, seen: str | None) -> None:
    _move_stream_past(redis, root_pk, old_last)
    _set_state(redis, root_pk, generation, epoch, seen)


# ---- draining one tree ----


@dataclass(slots=True)
class _Tree:
    """One tree's part of a drain transaction (several trees share one: ``_drain_group``)."""

    cursor: LogCursor
    state: dict[str, str] = field(default_factory=dict)
    raw: list[tuple[str, dict[Any, Any]]] = field(default_factory=list)
    facts: list[StoredFact] = field(default_factory=list)
    given_back: list[tuple[log.Entry, list[int]]] = field(default_factory=list)
    duplicates: int = 0
    dead: int = 0
    full: bool = False  # read as many entries as it was allowed: more may be due
    after: int | None = None  # entries after this batch when it was read (None: not known)
    reopened: tuple[str, int, str, str | None] | None = None  # (generation, epoch, old last entry, gen seen)
    forward: tuple[int, str] | None = None  # (epoch, cursor): Redis came back older, move its stream forward

    @property
    def again(self) -> bool:
        return self.full or self.reopened is not None or self.forward is not None


GROUP_TREES = 50  # trees drained in one transaction by drain() (small trees: one commit for many)


def drain_tree(
    root_pk: int,
    *,
    using: str | None = None,
    delay: float | None = None,
    max_batches: int | None = None,
    wait: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> DrainReport:
    """Persist the tree's stream, one transaction per batch, until nothing durable is left (or ``max_batches``, or
    ``should_stop()`` answers true between two batches). ``delay``: the durability delay (``drain_delay`` when
    ``None``). ``wait``: wait for another drainer's batch instead of skipping the tree. Raises ``LogUnavailable``
    without a django-redis metering cache or when Redis fails (the batch in flight is rolled back)."""
    using = _using(using)
    redis = _redis()
    delay = drain_delay(redis) if delay is None else delay
    return _drain_trees(redis, [root_pk], using, delay, max_batches, None, wait, should_stop)[0]


def _drain_trees(
    redis: Any,
    root_pks: list[int],
    using: str,
    delay: float,
    max_batches: int | None,
    budget: int | None,
    wait: bool,
    should_stop: Callable[[], bool] | None,
) -> tuple[DrainReport, set[int]]:
    """Drain the trees, up to ``GROUP_TREES`` per transaction, each until nothing durable is left or a bound is hit
    (``max_batches`` per tree, ``budget`` transactions in all, ``should_stop``). Returns the report and the trees
    found empty (they may leave the work list)."""
    started = time.monotonic()
    size = max(1, int(metering_settings.LOG_DRAIN_BATCH))
    report = DrainReport()
    looked: set[int] = set()
    rounds: dict[int, int] = dict.fromkeys(root_pks, 0)
    reopens: dict[int, int] = dict.fromkeys(root_pks, 0)
    pending = list(root_pks)
    empty: set[int] = set()
    while pending:
        if (budget is not None and report.batches >= budget) or (should_stop and should_stop()):
            report.more = True
            break
        group = pending[:GROUP_TREES]
        try:
            trees = _drain_group(redis, group, using, delay, size, wait, report)
        except _Busy:
            trees = {}
        except counters.RedisError as error:
            counters.note_unreachable()
            raise LogUnavailable(f"Redis failed while draining trees {group[:5]}: {type(error).__name__}") from error
        if any(tree.raw for tree in trees.values()):
            report.batches += 1
        rest = pending[GROUP_TREES:]
        for root_pk in group:
            tree = trees.get(root_pk)
            if tree is None:
                if root_pk not in looked:
                    report.skipped += 1
                continue
            looked.add(root_pk)
            if tree.raw:
                rounds[root_pk] += 1
            if tree.reopened is not None or tree.forward is not None:
                reopens[root_pk] += 1  # drain it again under its new state (not forever)
            if not tree.again or reopens[root_pk] > 2:
                waiting = tree.after if tree.after is not None else _waiting(redis, root_pk)
                report.waiting += waiting
                if waiting == 0:
                    empty.add(root_pk)
            elif max_batches is not None and rounds[root_pk] >= max_batches:
                report.more = True
                report.waiting += tree.after if tree.after is not None else _waiting(redis, root_pk)
            else:
                rest.append(root_pk)
        pending = rest
    report.trees += len(looked)
    report.seconds = time.monotonic() - started
    return report, empty


def _cursors(root_pks: list[int], using: str, *, skip_locked: bool) -> dict[int, LogCursor]:
    """The trees' cursor rows, locked until the transaction ends (created when missing). Absent: another drainer
    holds it (only with ``skip_locked``), or the tree's root no longer exists (logged)."""
    rows = LogCursor.objects.using(using).select_for_update(skip_locked=skip_locked)
    found = {cursor.root_id: cursor for cursor in rows.filter(root_id__in=root_pks)}
    missing = [pk for pk in root_pks if pk not in found]
    if missing and skip_locked:
        held = set(LogCursor.objects.using(using).filter(root_id__in=missing).values_list("root_id", flat=True))
        missing = [pk for pk in missing if pk not in held]
    if missing:
        alive = set(Tenant.objects.using(using).filter(pk__in=missing).values_list("pk", flat=True))
        for gone in sorted(set(missing) - alive):
            logger.error("log mode: tree %s has a stream but its root tenant no longer exists; left in Redis", gone)
        if alive:
            created = [LogCursor(root_id=pk) for pk in sorted(alive)]
            LogCursor.objects.using(using).bulk_create(created, ignore_conflicts=True)
            found.update((cursor.root_id, cursor) for cursor in rows.filter(root_id__in=sorted(alive)))
    return found


def _drain_group(
    redis: Any, root_pks: list[int], using: str, delay: float, size: int, wait: bool, report: DrainReport
) -> dict[int, _Tree]:
    """One transaction over the trees: {root pk: its part} for the trees it locked (another drainer holds the
    others)."""
    # Only a cursor this transaction did not move is known to be committed (a mover drains inside its own).
    trim = "0" if connections[using].in_atomic_block else "1"
    with transaction.atomic(using=using):
        # The trees' locks shared first (before the cursor rows, the order a mover takes them in): a move of a
        # subtree waits for the batch, and the batch reads lineages after any move committed before it.
        lock_trees(root_pks, exclusive=False, using=using)
        cursors = _cursors(root_pks, using, skip_locked=not wait)
        if not cursors:
            return {}
        allowed = str(max(1, size // len(cursors)))  # the batch's entries shared among its trees
        # One round trip for all: each tree's state hash, last-generated id, and entries old enough to be durable.
        pipe = redis.pipeline(transaction=False)
        read = scripts.script(redis, "metering", "log_read")
        for root_pk, cursor in cursors.items():
            read(
                keys=[log.stream_key(root_pk), log.state_key(root_pk)],
                args=[cursor.last_entry, str(int(delay * 1000)), allowed, trim, cursor.generation],
                client=pipe,
            )
        trees: dict[int, _Tree] = {}
        for (root_pk, cursor), answer in zip(cursors.items(), pipe.execute(), strict=True):
            gen, epoch_text, last, entries, length = answer
            tree = trees[root_pk] = _Tree(cursor)
            tree.state = {name: _text(value) for name, value in (("gen", gen), ("epoch", epoch_text)) if _text(value)}
            stream_last = _text(last) or None
            if not cursor.generation or tree.state.get("gen") != cursor.generation:
                if not tree.state and not cursor.generation and stream_last is None:
                    tree.after = 0  # never opened: nothing to drain
                    continue
                tree.reopened = (*_reopen(cursor, tree.state, using, report), tree.state.get("gen"))
                continue  # the stream's entries are another generation's: drained after the reopening
            tree.forward = _check_older(cursor, stream_last, using, report)
            if tree.forward is None:
                tree.raw = [(_text(entry_id), _pairs(fields)) for entry_id, fields in entries]
                tree.full = len(entries) >= int(allowed)
                tree.after = max(0, int(length) - len(entries)) if trim == "1" else None
        if any(tree.raw for tree in trees.values()):
            _persist(redis, [tree for tree in trees.values() if tree.raw], using)
    for root_pk, tree in trees.items():
        if tree.reopened is not None:
            generation, epoch, old_last, seen = tree.reopened
            _after_open(redis, root_pk, old_last, generation, epoch, seen)
        elif tree.forward is not None:
            epoch, last = tree.forward
            _move_stream_past(redis, root_pk, last)
            _set_state(redis, root_pk, tree.cursor.generation, epoch, tree.cursor.generation)
        report.entries += len(tree.raw)
        report.facts += len(tree.facts)
        report.duplicates += tree.duplicates
        report.dead += tree.dead
    return trees


def _check_older(cursor: LogCursor, last: str | None, using: str, report: DrainReport) -> tuple[int, str] | None:
    """Redis came back with OLDER data (same generation, but the stream's last-generated id is below the cursor):
    note the gap, bump the epoch (counters built on the older data are retired). Returns (the new epoch, the cursor)
    to move the stream forward after the commit, or ``None`` when all is well."""
    if cursor.last_entry == "0-0":
        return None
    if last is not None and _id(last) >= _id(cursor.last_entry):
        return None
    note = (
        f"Redis holds an older copy of this tree's log (its stream ends at {last or 'nothing'}, the database has "
        f"persisted up to {cursor.last_entry}): facts admitted after {last or 'the copy'} and not yet persisted may "
        "be missing; the tree's counters are rebuilt from the database."
    )
    LogGap.objects.using(using).create(
        root_id=cursor.root_id,
        generation=cursor.generation,
        after_entry=cursor.last_entry,
        last_drained_at=cursor.last_drained_at,
        note=note,
    )
    report.gaps += 1
    logger.error(
        "log mode: tree %s: Redis came back with older data (stream at %s, persisted up to %s of generation %s)",
        cursor.root_id,
        last,
        cursor.last_entry,
        cursor.generation,
    )
    counters.bump_epochs([cursor.root_id], using)
    return counters.current_epoch(cursor.root_id, using), cursor.last_entry


def _fast_decode(entry_id: str, values: dict[Any, Any]) -> log.Entry:
    """``log.Entry.decode`` for a reply of bytes, without a text copy of every field first (the drainer's hottest
    Python: ~40% less time per entry). Same fields, same conversions (``tests/metering/test_log_drain.py``
    compares them)."""
    metadata = values.get(b"m")
    reservation = values.get(b"rv")
    return log.Entry(
        tenant_pk=int(values[b"t"]),
        path=values[b"p"].decode(),
        feature=values[b"f"].decode(),
        units=int(values[b"u"]),
        timestamp=log.from_micros(values[b"ts"]),
        transaction_id=values[b"x"].decode(),
        recorded_at=log.from_micros(values[b"at"]),
        epoch=int(values[b"e"]),
        metadata=json.loads(metadata) if metadata else {},
        reservation=int(reservation) if reservation else None,
        entry_id=entry_id,
    )


def _decode(entry_id: Any, fields: dict[Any, Any]) -> tuple[log.Entry | None, str]:
    """The entry, or (None, why it cannot become a fact)."""
    try:
        entry = _fast_decode(entry_id, fields) if b"t" in fields else log.Entry.decode(entry_id, fields)
    except (KeyError, ValueError, TypeError, OverflowError, UnicodeDecodeError) as error:
        return None, f"cannot be decoded: {type(error).__name__}: {error}"[:500]
    if not 0 <= entry.units <= MAX_UNITS:
        return None, f"units {entry.units} out of range"
    if not entry.feature or len(entry.feature) > MAX_FEATURE_LENGTH:
        return None, "feature name empty or too long"
    if not entry.transaction_id or len(entry.transaction_id) > MAX_TRANSACTION_ID_LENGTH:
        return None, "transaction id empty or too long"
    if not isinstance(entry.metadata, dict):
        return None, "metadata is not an object"
    try:
        entry.lineage_pks  # noqa: B018 (a path that does not parse)
    except ValueError:
        return None, f"path {entry.path!r} does not parse"
    return entry, ""


def _persist(redis: Any, trees: list[_Tree], using: str) -> None:
    """Inside the batch's transaction: facts, rollups, outbox rows, dead entries, give-backs, the cursors."""
    entries: list[tuple[_Tree, log.Entry]] = []
    dead: list[LogDeadEntry] = []
    for tree in trees:
        for entry_id, fields in tree.raw:
            entry, why = _decode(entry_id, fields)
            if entry is None:
                dead.append(_dead(tree.cursor, entry_id, fields, why))
                tree.dead += 1
            else:
                entries.append((tree, entry))
    paths = _lineages({entry.tenant_pk for _, entry in entries}, using)
    _lock_foreign_roots({tree.cursor.root_id for tree in trees}, paths, using)
    unique: dict[tuple[int, str], tuple[_Tree, log.Entry]] = {}
    for tree, entry in entries:
        if entry.tenant_pk not in paths:
            dead.append(_dead(tree.cursor, entry.entry_id, None, "tenant no longer exists", entry))
            tree.dead += 1
            tree.given_back.append((entry, entry.lineage_pks))
        elif (entry.tenant_pk, entry.transaction_id) in unique:
            tree.given_back.append((entry, entry.lineage_pks))  # twice in one batch: the first one is the fact
            tree.duplicates += 1
        else:
            unique[(entry.tenant_pk, entry.transaction_id)] = (tree, entry)
    inserted = insert_facts([entry for _, entry in unique.values()], using)
    facts: list[StoredFact] = []
    for key, (tree, entry) in unique.items():
        record_id = inserted.get(key)
        if record_id is None:
            tree.given_back.append((entry, entry.lineage_pks))  # the database had it: a duplicate
            tree.duplicates += 1
        else:
            fact = StoredFact(record_id, entry.tenant_pk, tuple(paths[entry.tenant_pk]), entry)
            tree.facts.append(fact)
            facts.append(fact)
    moved = {
        root
        for fact in facts
        if list(fact.lineage_pks) != fact.entry.lineage_pks
        for root in (fact.lineage_pks[0], fact.entry.lineage_pks[0])
    }
    if moved:
        # Admitted under a lineage that changed while it waited (a move): the counters that counted it are the old
        # lineage's, and the new tree's may have been rebuilt without it. Retire both trees' counters as of this
        # commit (pushed on commit): they are rebuilt from the database, which now holds it under its new lineage.
        counters.bump_epochs(moved, using)
    refused = _roll_up(facts, {fact.record_id: tree for tree in trees for fact in tree.facts}, using)
    if refused:
        # Admitted by Redis (its counters are bignums) but past the hour's rollup range: commit mode would have
        # refused them (UsageTotalOutOfRange). Kept as dead entries and given back, so they do not poison the batch
        # (and every tree drained with it) on every cycle.
        UsageRecord.objects.using(using).filter(pk__in=[fact.record_id for fact, _ in refused]).delete()
        for fact, tree in refused:
            tree.facts.remove(fact)
            facts.remove(fact)
            dead.append(_dead(tree.cursor, fact.entry.entry_id, None, "hourly rollup total out of range", fact.entry))
            tree.dead += 1
            tree.given_back.append((fact.entry, fact.entry.lineage_pks))
    if facts:
        adapter = _adapter()
        hook = getattr(adapter, "on_stored_many", None)
        if hook is not None:
            hook(facts)
        elif getattr(adapter, "on_stored", None) is not None:
            # An adapter with only the per-fact hook (commit mode's): each fact's, in the batch's transaction, so its
            # rows (an outbox's) commit or roll back with the facts, exactly as in commit mode.
            for fact, valid, context in _described(facts, using):
                adapter.on_stored(valid, fact.record_id, context)
        facts_drained.send(sender=UsageRecord, facts=facts, using=using)
    if dead:
        LogDeadEntry.objects.using(using).bulk_create(dead, ignore_conflicts=True)
        logger.error("log mode: %s stream entries cannot become facts (LogDeadEntry)", len(dead))
    _give_back(redis, [tree for tree in trees if tree.given_back], using)
    now = timezone.now()
    for tree in trees:
        tree.cursor.last_entry = tree.raw[-1][0]
        tree.cursor.facts += len(tree.facts)
        tree.cursor.last_drained_at = now
    LogCursor.objects.using(using).bulk_update(
        [tree.cursor for tree in trees], ["last_entry", "facts", "last_drained_at"]
    )
    trims = [(tree.cursor.root_id, tree.cursor.last_entry) for tree in trees]
    # After the outermost commit (a mover drains inside its own transaction): the entries go, the signal fires.
    transaction.on_commit(lambda: _after_commit(redis, trims, facts, using), using=using)


def _rollup_rows(facts: Iterable[StoredFact]) -> Iterable[tuple[int, str, Any, int, int]]:
    return (
        (level, fact.entry.feature, floor_hour(fact.entry.timestamp), fact.entry.units, 1)
        for fact in facts
        for level in fact.lineage_pks
    )


def _roll_up(facts: list[StoredFact], owners: dict[int, _Tree], using: str) -> list[tuple[StoredFact, _Tree]]:
    """The facts' rollups, aggregated per batch. Returns the facts the rollup range refused (with their tree), each
    rolled back alone: the batch in one upsert per row first; only when that is refused, fact by fact (rare)."""
    try:
        with transaction.atomic(using=using):
            rollups.add_many(_rollup_rows(facts), using=using)
        return []
    except UsageTotalOutOfRange:
        pass
    refused: list[tuple[StoredFact, _Tree]] = []
    for fact in facts:
        try:
            with transaction.atomic(using=using):
                rollups.add_many(_rollup_rows([fact]), using=using)
        except UsageTotalOutOfRange:
            refused.append((fact, owners[fact.record_id]))
    return refused


def _dead(
    cursor: LogCursor, entry_id: str, fields: dict[Any, Any] | None, why: str, entry: log.Entry | None = None
) -> LogDeadEntry:
    raw = (
        {_lossless(k): _lossless(v) for k, v in fields.items()}
        if fields is not None
        else dict(zip(*[iter(entry.encode())] * 2, strict=True))
        if entry is not None
        else {}
    )
    return LogDeadEntry(root_id=cursor.root_id, generation=cursor.generation, entry_id=entry_id, fields=raw, reason=why)


def _lossless(value: Any) -> str:
    """Text for the operator's record: bytes that are not UTF-8 shown with backslash escapes (never an error)."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def _lineages(tenant_pks: set[int], using: str) -> dict[int, list[int]]:
    """Each tenant's lineage as it is now (one query); a tenant that no longer exists is absent."""
    if not tenant_pks:
        return {}
    rows = Tenant.objects.using(using).filter(pk__in=sorted(tenant_pks)).values_list("pk", "path")
    return {pk: [int(part) for part in path.strip("/").split("/")] for pk, path in rows}


def _lock_foreign_roots(root_pks: set[int], paths: dict[int, list[int]], using: str) -> None:
    """A tenant moved to another tree since it was admitted: that tree is locked shared too, so a move there waits.
    Tried, not waited for (a mover holds its trees exclusively and may be waiting for this tree's cursor): busy ->
    the batch is given up and redone on the next cycle."""
    foreign = sorted({lineage[0] for lineage in paths.values()} - root_pks)
    connection = connections[using]
    if not foreign or connection.vendor != "postgresql":
        return
    from tenants.locks import ADVISORY_NAMESPACE, _int4

    with connection.cursor() as sql:
        for other in foreign:
            sql.execute("SELECT pg_try_advisory_xact_lock_shared(%s, %s)", [ADVISORY_NAMESPACE, _int4(other)])
            if not sql.fetchone()[0]:
                raise _Busy(other)


class _Busy(Exception):
    pass


def _give_back(redis: Any, trees: list[_Tree], using: str) -> None:
    """Lower the live counters by the units of entries that did not become facts (each entry's lineage as the
    writer counted it), under every live epoch of its tree (the database's and the one Redis's state names, when
    they differ), once per entry (marker keys). One script call per tree (its keys share the tree's slot)."""
    if not trees:
        return
    pipe = redis.pipeline(transaction=False)
    giveback = scripts.script(redis, "metering", "log_giveback")
    for tree in trees:
        root_pk = tree.cursor.root_id
        epochs = {counters.current_epoch(root_pk, using)}
        if tree.state.get("epoch", "").lstrip("-").isdigit():
            epochs.add(int(tree.state["epoch"]))
        epochs.discard(counters.NOT_OURS)
        tag = counters.tree_tag(root_pk)
        keys: list[str] = []
        args: list[str] = [str(GIVEBACK_TTL_SECONDS)]
        for entry, lineage in tree.given_back:
            own = lineage if lineage and lineage[0] == root_pk else []  # counters live in this tree only
            counter_keys = [
                name
                for epoch in sorted(epochs)
                for name in (counters.keys_for_fact(own, entry.feature, entry.timestamp, epoch=epoch) if own else [])
            ]
            keys += [f"{tag}:giveback:{tree.cursor.generation}:{entry.entry_id}", *counter_keys]
            args += [str(len(counter_keys)), str(-entry.units)]
        giveback(keys=keys, args=args, client=pipe)
    pipe.execute()


def _after_commit(redis: Any, trims: list[tuple[int, str]], facts: list[StoredFact], using: str) -> None:
    try:
        pipe = redis.pipeline(transaction=False)
        for root_pk, last_entry in trims:
            if last_entry != "0-0":
                pipe.execute_command("XTRIM", log.stream_key(root_pk), "MINID", _next_id(last_entry))
        pipe.execute()
    except counters.RedisError as error:  # left in the streams: the cursors are past them, the next read trims
        logger.warning("log mode: could not trim persisted entries (%s)", type(error).__name__)
    if facts and usage_recorded.receivers:
        _send_recorded(facts, using)


def _described(facts: Sequence[StoredFact], using: str) -> list[tuple[StoredFact, ValidEvent, TenantContext]]:
    """Each fact as commit mode's hooks see it: its event and its tenant's context (one query for all levels); a
    fact whose lineage is no longer complete is left out."""
    levels = {pk for fact in facts for pk in fact.lineage_pks}
    refs = {
        pk: TenantRef(pk, ext, kind, bool(exempt), bool(active))
        for pk, ext, kind, exempt, active in Tenant.objects.using(using)
        .filter(pk__in=sorted(levels))
        .values_list("pk", "external_id", "kind", "exempt", "is_active")
    }
    described = []
    for fact in facts:
        if any(pk not in refs for pk in fact.lineage_pks):
            continue
        lineage = tuple(refs[pk] for pk in fact.lineage_pks)
        entry = fact.entry
        valid = ValidEvent(
            lineage[-1].tenant_id, entry.feature, entry.units, entry.timestamp, entry.metadata, entry.transaction_id
        )
        described.append((fact, valid, TenantContext(tenant_id=lineage[-1].tenant_id, lineage=lineage)))
    return described


def _send_recorded(facts: list[StoredFact], using: str) -> None:
    """``usage_recorded`` per inserted fact, robust (a failing receiver is logged; the facts are committed)."""
    for fact, valid, context in _described(facts, using):
        for receiver, error in usage_recorded.send_robust(
            sender=UsageRecord, event=valid, record_id=fact.record_id, context=context
        ):
            if isinstance(error, Exception):
                logger.error("usage_recorded receiver %r failed: %s", receiver, error, exc_info=error)


def _adapter() -> Any:
    from .meter import get_meter

    return get_meter()


# ---- many trees ----


def _waiting(redis: Any, root_pk: int) -> int:
    """Entries in the tree's stream after the committed cursor (normally all of them: persisted ones are deleted)."""
    try:
        return int(redis.xlen(log.stream_key(root_pk)))
    except counters.RedisError:
        return 0


def listed_trees(redis: Any) -> list[int]:
    return sorted(int(_text(member)) for member in redis.smembers(log.trees_key()))


def _unlist(redis: Any, root_pk: int) -> bool:
    """Off the work list if its stream is empty; SREM first, then the atomic check, then SADD back when entries
    remain: a writer appending in between either lists the tree itself or is seen here. True when taken off.
    SREM and the check go in one pipeline: Redis runs them in that order (other clients may come in between, as
    they may between two round trips)."""
    keys = [log.stream_key(root_pk), log.listed_key(root_pk)]
    pipe = redis.pipeline(transaction=False)
    pipe.srem(log.trees_key(), root_pk)
    scripts.script(redis, "metering", "log_unlist")(keys=keys, args=[], client=pipe)
    if pipe.execute()[1]:
        redis.sadd(log.trees_key(), root_pk)
        return False
    return True


def drain(
    max_trees: int | None = None,
    *,
    using: str | None = None,
    max_batches: int | None = None,
    budget: int | None = None,
    delay: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DrainReport:
    """Drain every tree of the work list (``log.trees_key()``), in random order so parallel drainers spread; a tree
    another drainer holds is skipped (``SKIP LOCKED``). Bounds: ``max_trees``, ``max_batches`` per tree, ``budget``
    batches in all, ``should_stop()`` (asked between batches); ``report.more`` says a bound cut work short. The
    durability delay is read once per call. A tree whose stream is empty leaves the work list."""
    using = _using(using)
    redis = _redis()
    started = time.monotonic()
    try:
        delay = drain_delay(redis) if delay is None else delay
        roots = listed_trees(redis)
    except counters.RedisError as error:
        counters.note_unreachable()
        raise LogUnavailable(f"Redis failed before draining: {type(error).__name__}") from error
    random.shuffle(roots)
    chosen = roots[: max_trees if max_trees is not None else len(roots)]
    report, empty = _drain_trees(redis, chosen, using, delay, max_batches, budget, False, should_stop)
    for root_pk in chosen:
        if root_pk not in empty:
            continue
        try:
            if _unlist(redis, root_pk):
                report.unlisted.append(root_pk)
        except counters.RedisError as error:  # still listed: looked at again next time
            logger.warning("log mode: could not unlist tree %s (%s)", root_pk, type(error).__name__)
    if max_trees is not None and len(roots) > max_trees:
        report.more = True
    report.seconds = time.monotonic() - started
    return report


# ---- moves ----


def drain_for_move(root_pks: Iterable[int], *, using: str | None = None, timeout: float = 30.0) -> None:
    """Before a moved subtree's rollups move (inside the move's transaction, the trees locked exclusively): persist
    every entry the trees' streams held when the move began, waiting out the durability delay, so no fact is rolled
    up by a stale lineage after the move and counters rebuild from a consistent database. Entries appended during
    the move are drained afterwards, by the lineage the move commits."""
    using = _using(using)
    redis = counters.client()
    if redis is None:
        return
    delay = drain_delay(redis)
    deadline = time.monotonic() + timeout
    for root_pk in sorted(set(root_pks)):
        target = _stream_last_id(redis, root_pk)
        if target is None:
            continue
        while True:
            drain_tree(root_pk, using=using, delay=delay, wait=True)
            cursor = LogCursor.objects.using(using).filter(root_id=root_pk).values_list("last_entry", flat=True)
            last = cursor.first() or "0-0"
            pending = redis.xrange(log.stream_key(root_pk), f"({last}", target, count=1)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise LogUnavailable(f"tree {root_pk}'s stream could not be drained before the move")
            time.sleep(min(0.2, max(delay, 0.01)))


# ---- status ----


@dataclass(frozen=True, slots=True)
class TreeLag:
    root_pk: int
    entries: int  # entries not yet persisted
    oldest_age_seconds: float | None  # age of the oldest of them by Redis's clock


def lag(*, using: str | None = None) -> list[TreeLag]:
    """Per listed tree: entries not yet persisted and the age of the oldest (by Redis's clock)."""
    using = _using(using)
    redis = _redis()
    seconds, micros = redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    cursors = dict(LogCursor.objects.using(using).values_list("root_id", "last_entry"))
    out: list[TreeLag] = []
    for root_pk in listed_trees(redis):
        key = log.stream_key(root_pk)
        after = cursors.get(root_pk, "0-0")
        first = redis.xrange(key, f"({after}", "+", count=1)
        count = int(redis.xlen(key)) if first else 0
        age = max(0.0, (now_ms - _id(_text(first[0][0]))[0]) / 1000) if first else None
        out.append(TreeLag(root_pk, count, age))
    return out


def pending(*, using: str | None = None) -> dict[str, Any]:
    """Totals for status: entries not yet persisted, the age of the oldest, and the trees with entries."""
    trees = lag(using=using)
    ages = [tree.oldest_age_seconds for tree in trees if tree.oldest_age_seconds is not None]
    return {
        "entries": sum(tree.entries for tree in trees),
        "oldest_age_seconds": max(ages) if ages else None,
        "trees": [asdict(tree) for tree in trees if tree.entries],
    }
