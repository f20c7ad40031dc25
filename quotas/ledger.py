"""Where a quota is decided: one atomic check-and-count over every quota of every level of the lineage.

A ``Change`` says what must fit (``check_units``) and what to count (usage and/or reserved units). ``decide``
*returns* a ``Decision``: admitted (and counted), or refused (``allowed=False``, ``blocked`` the ``QuotaExceeded``
to raise, nothing counted). It runs inside the transaction that stores the change (``metering.recorder.FactWrite``
for a fact, ``quotas.handler`` for a reservation), with the tree locked shared, after the change is written:

- **Redis** (a django-redis cache): one Lua script (``lua/decide.lua``) reads the counters of every quota of every
  level; if any hard quota would be exceeded it changes nothing and says which; otherwise it adds to every live
  counter at once, exactly at any size (decimal strings, ``metering/lua/bignum.lua``). Keys share the tree's hash
  tag, so the script runs on Redis Cluster, and carry the tree's counter epoch read in the fact's own statement. A
  missing counter (flush, restart, TTL, a new epoch) aborts the attempt: the counters are rebuilt from the database
  with the tree locked exclusively (every writer in flight has finished), and the attempt is retried — so a lost
  Redis never lets usage overshoot.
- **Redis unreachable** (down, hung, refused): the attempt is retried with the tree locked exclusively, decided on
  the database, and the tree's epoch is bumped in the same transaction, so the counters Redis holds (if it comes
  back with them) are never used again. Exclusive, because a decision on the database must not run beside one on
  Redis that cannot see it.
- **Database** (no Redis): the tree's decisions on one feature are serialized by a lock (an advisory lock on
  PostgreSQL; an immediate transaction on SQLite), and each quota is summed from the rollups and open reservations,
  this change included.

Either way the caller raises a refusal inside the transaction, so the fact (and, on the database path, its rollups)
roll back: no level's usage grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import transaction

from metering import appender, counters, rollups, scripts
from metering.conf import metering_settings
from metering.events import ValidEvent, units_to_quantity
from metering.windows import Period
from tenants.context import TenantContext
from tenants.locks import lock_trees

from .exceptions import QuotaExceeded
from .models import QuotaReservation
from .rules import QuotaRule


@dataclass(frozen=True, slots=True)
class Change:
    """What one decision asks for. ``used_at``/``reserved_at`` pick the windows each delta counts in."""

    feature: str
    check_units: int = 0
    used_delta: int = 0
    used_at: datetime | None = None
    reserved_delta: int = 0
    reserved_at: datetime | None = None

    @property
    def moment(self) -> datetime:
        moment = self.used_at or self.reserved_at
        assert moment is not None
        return moment


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    """One quota after a decision: ``used`` counts usage plus open reservations."""

    tenant_id: str
    feature: str
    period: Period
    limit: Decimal
    used: Decimal
    hard: bool
    reset_at: datetime | None
    window_start: datetime | None
    quota_id: int = 0
    thresholds: tuple[int, ...] = ()
    used_before: Decimal = Decimal(0)

    @property
    def remaining(self) -> Decimal:
        return max(self.limit - self.used, Decimal(0))


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    statuses: tuple[QuotaStatus, ...] = ()
    blocked: QuotaExceeded | None = field(default=None, compare=False)

    @property
    def tightest(self) -> QuotaStatus | None:
        """The quota with the least room left (hard ones first): the one clients should pace themselves by."""
        candidates = [status for status in self.statuses if status.hard] or list(self.statuses)
        return min(candidates, key=lambda status: status.remaining, default=None)


class NeedsExclusive(Exception):
    """Decide again with the tree locked exclusively (no other writer in flight)."""


class NeedsRebuild(NeedsExclusive):
    """Counters a decision needs are missing from Redis; rebuild them (tree locked exclusively) and retry."""

    def __init__(self, rules: Sequence[QuotaRule], change: Change) -> None:
        super().__init__("quota counters missing")
        self.rules = list(rules)
        self.change = change


class RedisUnavailable(NeedsExclusive):
    """Redis failed during a decision: decide again, exclusively, on the database (see the module)."""


def exceeded(rule: QuotaRule, used_units: int, requested_units: int, moment: datetime) -> QuotaExceeded:
    return QuotaExceeded(
        tenant_id=rule.level.tenant_id,
        feature=rule.feature,
        limit=rule.limit,
        used=units_to_quantity(used_units),
        requested=units_to_quantity(requested_units),
        period=rule.period,
        reset_at=rule.window(moment)[1],
    )


def refused(error: QuotaExceeded) -> Decision:
    return Decision(allowed=False, blocked=error)


def _status(rule: QuotaRule, before: int, after: int, moment: datetime) -> QuotaStatus:
    start, end = rule.window(moment)
    return QuotaStatus(
        tenant_id=rule.level.tenant_id,
        feature=rule.feature,
        period=rule.period,
        limit=rule.limit,
        used=units_to_quantity(after),
        hard=rule.hard,
        reset_at=end,
        window_start=start,
        quota_id=rule.quota_id,
        thresholds=rule.thresholds,
        used_before=units_to_quantity(before),
    )


def _delta_for(rule: QuotaRule, change: Change) -> int:
    """How much of the change lands in this rule's window (a commit may span a window boundary)."""
    delta = 0
    start = rule.window(change.moment)[0]
    if change.used_delta and change.used_at is not None and rule.window(change.used_at)[0] == start:
        delta += change.used_delta
    if change.reserved_delta and change.reserved_at is not None and rule.window(change.reserved_at)[0] == start:
        delta += change.reserved_delta
    return delta


def use_redis() -> Any | None:
    return counters.client()


def lock_names(context: TenantContext, feature: str) -> list[str]:
    """Named locks to take first in the transaction, after the tree lock (held shared): the database path serializes
    one tree's decisions on one feature; Redis needs none (its script is atomic)."""
    return [f"quota:{context.root.pk}:{feature}"] if use_redis() is None else []


def decide(
    context: TenantContext,
    rules: Sequence[QuotaRule],
    change: Change,
    using: str,
    *,
    enforce: bool = True,
    used_written: bool = True,
    epoch: int = 0,
    exclusive: bool = False,
) -> Decision:
    """Check ``change`` against every rule and count it; a refusal (only when ``enforce``) is returned as
    ``Decision(allowed=False, blocked=QuotaExceeded(...))`` with nothing counted, for the caller to raise inside
    the transaction. Raises ``NeedsRebuild`` or ``RedisUnavailable`` (decide again, exclusively). Call inside the
    transaction that stores the change, after taking ``lock_names``, with ``rules`` read under ``epoch``
    (``rules.ruleset``).
    ``used_written``: the change's usage is already in the rollups (the database path sums them). ``epoch``: the
    tree's counter epoch read under the tree lock; ``exclusive``: that lock is held exclusively."""
    if epoch == counters.NOT_OURS:
        # The tree's counters are another owner's (``counters.counter_owner``: another namespace of this site, or
        # Redis while this process has none), whose deciders cannot see this decision: as with Redis down, decide
        # on the database with the tree locked exclusively, and claim the tree (retiring their counters).
        if rules and not exclusive:
            raise RedisUnavailable("the tree's counters belong to another owner")
        counters.bump_epochs([context.root.pk], using)
        return _decide_database(context, rules, change, using, enforce, used_written)
    redis = use_redis()
    if redis is not None:
        try:
            return _decide_redis(redis, context, rules, change, enforce, epoch)
        except counters.RedisError as error:
            counters.note_unreachable()
            if rules and not exclusive:
                # A decision on the database must not run beside decisions on Redis that cannot see it.
                raise RedisUnavailable(type(error).__name__) from None
            # Exclusive, or nothing to decide (a release): count on the database, retire the Redis counters.
            counters.bump_epochs([context.root.pk], using)
    return _decide_database(context, rules, change, using, enforce, used_written)


def _decide_redis(
    redis: Any,
    context: TenantContext,
    rules: Sequence[QuotaRule],
    change: Change,
    enforce: bool,
    epoch: int,
) -> Decision:
    moment = change.moment
    root = context.root.pk
    lineage = [level.pk for level in context.lineage]
    rule_keys: list[str] = []
    limits: list[str] = []
    for rule in rules:
        start = rule.window(moment)[0]
        rule_keys.append(
            counters.key(root, rule.level.pk, rule.feature, rule.period, start, counters.USED, epoch=epoch)
        )
        rule_keys.append(
            counters.key(root, rule.level.pk, rule.feature, rule.period, start, counters.RESERVED, epoch=epoch)
        )
        limits += [str(rule.limit_units), "1" if (rule.hard and enforce) else "0"]
    used_keys = (
        counters.keys_for_fact(lineage, change.feature, change.used_at, counters.USED, epoch=epoch)
        if change.used_delta and change.used_at
        else []
    )
    reserved_keys = (
        counters.keys_for_fact(lineage, change.feature, change.reserved_at, counters.RESERVED, epoch=epoch)
        if change.reserved_delta and change.reserved_at
        else []
    )
    # Every amount travels as a decimal string: the script adds and compares them exactly (no doubles).
    result = scripts.script(redis, "quotas", "decide")(
        keys=rule_keys + used_keys + reserved_keys,
        args=[
            len(rules),
            len(used_keys),
            len(reserved_keys),
            str(change.used_delta),
            str(change.reserved_delta),
            str(change.check_units),
            *limits,
        ],
    )
    status = int(result[0])
    if status == 0:
        raise NeedsRebuild(rules, change)
    if status == 2:
        rule = rules[int(result[1]) - 1]
        return refused(exceeded(rule, int(result[2]) + int(result[3]), change.check_units, moment))
    statuses = []
    for index, rule in enumerate(rules):
        before_units = int(result[1 + 2 * index]) + int(result[2 + 2 * index])
        statuses.append(_status(rule, before_units, before_units + _delta_for(rule, change), moment))
    return Decision(allowed=True, statuses=tuple(statuses))


def reserved_units(level_path: str, feature: str, start: datetime | None, end: datetime | None, using: str) -> int:
    rows = QuotaReservation.objects.using(using).filter(
        tenant__path__startswith=level_path, feature=feature, state=QuotaReservation.State.ACTIVE
    )
    if start is not None and end is not None:
        rows = rows.filter(window_at__gte=start, window_at__lt=end)
    return rollups.exact_sum(rows)


def _decide_database(
    context: TenantContext,
    rules: Sequence[QuotaRule],
    change: Change,
    using: str,
    enforce: bool,
    used_written: bool = True,
) -> Decision:
    # The change is already written (fact, reservation rows, and its rollups when ``used_written``), so the sums
    # below include it.
    moment = change.moment
    statuses = []
    for rule in rules:
        start, end = rule.window(moment)
        after = rollups.sum_units(rule.level.pk, rule.feature, start, end, using=using) + reserved_units(
            rule.level_path, rule.feature, start, end, using
        )
        if not used_written and change.used_at is not None and rule.window(change.used_at)[0] == start:
            after += change.used_delta
        before_units = after - _delta_for(rule, change)
        if enforce and rule.hard and before_units + change.check_units > rule.limit_units:
            return refused(exceeded(rule, before_units, change.check_units, moment))
        statuses.append(_status(rule, before_units, after, moment))
    return Decision(allowed=True, statuses=tuple(statuses))


def decide_exclusively(
    context: TenantContext,
    rules: Sequence[QuotaRule],
    change: Change,
    using: str,
    *,
    enforce: bool = True,
    used_written: bool = True,
    epoch: int = 0,
) -> Decision:
    """``decide`` for a caller that holds the tree lock exclusively: missing counters are rebuilt on the spot.

    No writer can be in flight, so rebuilding here is exact however often Redis is lost meanwhile.
    """
    for _ in range(50):
        try:
            return decide(
                context,
                rules,
                change,
                using,
                enforce=enforce,
                used_written=used_written,
                epoch=epoch,
                exclusive=True,
            )
        except NeedsRebuild as missing:
            try:
                rebuild(context, missing.rules, missing.change.moment, locked=True, pending=change, epoch=epoch)
            except counters.RedisError:
                # Redis went away between the decision and the rebuild: decide on the database.
                counters.note_unreachable()
                counters.bump_epochs([context.root.pk], using)
                return _decide_database(context, rules, change, using, enforce, used_written)
    raise RuntimeError("Redis keeps losing the quota counters")  # pragma: no cover


def rebuild(
    context: TenantContext,
    rules: Sequence[QuotaRule],
    moment: datetime,
    *,
    locked: bool = False,
    pending: Change | None = None,
    epoch: int | None = None,
) -> None:
    """Set every counter the rules need from the database, with the tree locked exclusively, under ``epoch`` (read
    under that lock; ``None``: read it here).

    ``locked``: the caller's transaction already holds the tree lock exclusively and has already written
    ``pending`` (its fact, rollups or reservation rows), which the database sums therefore include: it is left out
    of the counters here, because the decision that follows adds it.
    """
    redis = use_redis()
    if redis is None or epoch == counters.NOT_OURS:
        return
    using = metering_settings.DATABASE_ALIAS
    root = context.root.pk
    ttl = int(metering_settings.COUNTER_TTL_SECONDS)
    with transaction.atomic(using=using):
        if not locked:
            lock_trees([root], exclusive=True, using=using)
        if epoch is None or not locked:
            epoch = counters.current_epoch(root, using)
        if epoch == counters.NOT_OURS:
            return  # another owner's counters: the next decision claims the tree (see ``decide``)
        values: dict[str, int] = {}
        for rule in rules:
            start, end = rule.window(moment)
            used_key = counters.key(root, rule.level.pk, rule.feature, rule.period, start, counters.USED, epoch=epoch)
            reserved_key = counters.key(
                root, rule.level.pk, rule.feature, rule.period, start, counters.RESERVED, epoch=epoch
            )
            values[used_key] = rollups.sum_units(rule.level.pk, rule.feature, start, end, using=using)
            values[reserved_key] = reserved_units(rule.level_path, rule.feature, start, end, using)
            if pending is not None:
                if pending.used_at is not None and rule.window(pending.used_at)[0] == start:
                    values[used_key] -= pending.used_delta
                if pending.reserved_at is not None and rule.window(pending.reserved_at)[0] == start:
                    values[reserved_key] -= pending.reserved_delta
        pipe = redis.pipeline(transaction=False)
        for key, value in values.items():
            pipe.set(key, str(value), ex=ttl, nx=True)  # one that exists was rebuilt and counted since: newer
        pipe.execute()


# ---- log mode (``METERING["WRITE_MODE"] = "log"``): the same decision, inside the append's one Redis call ----


def log_limits(rules: Sequence[QuotaRule], change: Change, *, enforce: bool = True) -> list[appender.Limit]:
    """The rules as the generic limits ``metering.appender`` checks (a soft rule, or ``enforce=False``: counted and
    reported, never blocking)."""
    moment = change.moment
    limits = []
    for rule in rules:
        start, end = rule.window(moment)
        limits.append(
            appender.Limit(
                rule.level.pk, rule.level_path, rule.period, start, end, rule.limit_units, rule.hard and enforce
            )
        )
    return limits


def decide_logged(
    snap: appender.Snapshot,
    rules: Sequence[QuotaRule],
    change: Change,
    *,
    enforce: bool = True,
    valid: ValidEvent | None = None,
    reservation: int | None = None,
) -> Decision | appender.Outcome:
    """Decide ``change`` against ``rules`` (read under ``snap.epoch``), count it and append ``valid`` in one script
    call. Returns the ``Decision``; raises ``QuotaExceeded`` (nothing changed), ``DuplicateUsageEvent`` or
    ``LogStoreUnavailable``; returns the ``Outcome`` when the attempt changed nothing: ``appender.repair`` it (outside
    the caller's transaction), then decide again with the snapshot it returns (the rules may differ under its
    epoch)."""
    outcome = appender.attempt(
        snap,
        appender.Change(
            feature=change.feature,
            check_units=change.check_units,
            used_delta=change.used_delta,
            used_at=change.used_at,
            reserved_delta=change.reserved_delta,
            reserved_at=change.reserved_at,
        ),
        log_limits(rules, change, enforce=enforce),
        valid=valid,
        reservation=reservation,
    )
    if outcome.retry:
        return outcome
    moment = change.moment
    if outcome.refused is not None:
        used, reserved = outcome.before[0]
        raise exceeded(rules[outcome.refused], used + reserved, change.check_units, moment)
    statuses = []
    for rule, (used, reserved) in zip(rules, outcome.before, strict=True):
        statuses.append(_status(rule, used + reserved, used + reserved + _delta_for(rule, change), moment))
    return Decision(allowed=True, statuses=tuple(statuses))
