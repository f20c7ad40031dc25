"""Where a quota is decided: one atomic check-and-count over every quota of every level of the lineage.

A ``Change`` says what must fit (``check_units``) and what to count (usage and/or reserved units). The decision
runs inside the fact's transaction, with the tree locked shared, as its last step:

- **Redis** (a django-redis cache): one Lua script reads the counters of every quota of every level; if any hard
  quota would be exceeded it changes nothing and says which; otherwise it adds to every live counter at once. Keys
  share the tree's hash tag, so the script runs on Redis Cluster. A missing counter (flush, restart, TTL) aborts
  the attempt: the counters are rebuilt from the database with the tree locked exclusively (every writer in
  flight has finished), and the attempt is retried — so a lost Redis never lets usage overshoot.
- **Database** (no Redis): the tree's decisions on one feature are serialized by a lock (an advisory lock on
  PostgreSQL; an immediate transaction on SQLite), and each quota is summed from the rollups and open reservations,
  this change included.

Either way a rejection raises ``QuotaExceeded`` inside the transaction, so the fact and every counter roll back:
no level's usage grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import Sum

from metering import counters, rollups
from metering.conf import metering_settings
from metering.events import units_to_quantity
from metering.windows import Period
from tenants.context import TenantContext
from tenants.locks import lock_name, lock_trees

from .exceptions import QuotaExceeded
from .models import QuotaReservation
from .rules import QuotaRule, token_key

DECIDE = """
-- KEYS: per rule (used, reserved) pairs; then usage keys to add to; then reserved keys to add to; then, if a
-- token is given, the tree's rules token key.
-- ARGV: rules, usage keys, reserved keys, usage delta, reserved delta, units to check, then (limit, hard) per
-- rule, then the rules token the caller read its rules under ('' when it did not use the token).
local rules, used_keys, reserved_keys = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local used_delta, reserved_delta, check = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local token = ARGV[7 + 2 * rules]
if token ~= '' and redis.call('GET', KEYS[#KEYS]) ~= token then return {3} end
local missing = {}
for i = 1, 2 * rules do
    if redis.call('EXISTS', KEYS[i]) == 0 then missing[#missing + 1] = i end
end
if #missing > 0 then return {0, unpack(missing)} end
local before = {1}
for i = 1, rules do
    local used = tonumber(redis.call('GET', KEYS[2 * i - 1]))
    local reserved = tonumber(redis.call('GET', KEYS[2 * i]))
    local limit, hard = tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[6 + 2 * i])
    if hard == 1 and used + reserved + check > limit then return {2, i, used, reserved} end
    before[#before + 1] = used
    before[#before + 1] = reserved
end
local offset = 2 * rules
if used_delta ~= 0 then
    for i = offset + 1, offset + used_keys do
        if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], used_delta) end
    end
end
offset = offset + used_keys
if reserved_delta ~= 0 then
    for i = offset + 1, offset + reserved_keys do
        if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], reserved_delta) end
    end
end
return before
"""

_scripts: dict[int, Any] = {}


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


class StaleRules(Exception):
    """The rules a decision was given are older than the tree's last limit change; reload them and decide again."""


class NeedsRebuild(Exception):
    """Counters a decision needs are missing from Redis; rebuild them (outside the transaction) and retry."""

    def __init__(self, rules: Sequence[QuotaRule], change: Change) -> None:
        super().__init__("quota counters missing")
        self.rules = list(rules)
        self.change = change


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
    token: str | None = None,
    used_written: bool = True,
) -> Decision:
    """Check ``change`` against every rule and count it. Raises ``QuotaExceeded`` (when ``enforce``),
    ``NeedsRebuild``, or ``StaleRules`` (``token``: the rules token ``rules`` were read under, see ``rules.ruleset``).
    Call inside the transaction that stores the change, after taking ``lock_names``. ``used_written``: the change's
    usage is already in the rollups (the database path sums them)."""
    redis = use_redis()
    if redis is not None:
        try:
            return _decide_redis(redis, context, rules, change, enforce, token)
        except counters.RedisError:
            # Redis failed mid-decision: decide on the database instead, and distrust the tree's counters.
            lock_name(f"quota:{context.root.pk}:{change.feature}", using=using)
            root = context.root.pk
            transaction.on_commit(lambda: counters.drop_trees([root]), using=using)
    return _decide_database(context, rules, change, using, enforce, used_written)


def _decide_redis(
    redis: Any, context: TenantContext, rules: Sequence[QuotaRule], change: Change, enforce: bool, token: str | None
) -> Decision:
    moment = change.moment
    root = context.root.pk
    lineage = [level.pk for level in context.lineage]
    rule_keys: list[str] = []
    limits: list[int] = []
    for rule in rules:
        start = rule.window(moment)[0]
        rule_keys.append(counters.key(root, rule.level.pk, rule.feature, rule.period, start, counters.USED))
        rule_keys.append(counters.key(root, rule.level.pk, rule.feature, rule.period, start, counters.RESERVED))
        limits += [rule.limit_units, 1 if (rule.hard and enforce) else 0]
    used_keys = (
        counters.keys_for_fact(lineage, change.feature, change.used_at, counters.USED)
        if change.used_delta and change.used_at
        else []
    )
    reserved_keys = (
        counters.keys_for_fact(lineage, change.feature, change.reserved_at, counters.RESERVED)
        if change.reserved_delta and change.reserved_at
        else []
    )
    script = _scripts.get(id(redis))
    if script is None:
        script = _scripts[id(redis)] = redis.register_script(DECIDE)
    token_keys = [] if token is None else [token_key(root)]
    result = script(
        keys=rule_keys + used_keys + reserved_keys + token_keys,
        args=[
            len(rules),
            len(used_keys),
            len(reserved_keys),
            change.used_delta,
            change.reserved_delta,
            change.check_units,
            *limits,
            token or "",
        ],
    )
    status = int(result[0])
    if status == 3:
        raise StaleRules()
    if status == 0:
        raise NeedsRebuild(rules, change)
    if status == 2:
        rule = rules[int(result[1]) - 1]
        error = exceeded(rule, int(result[2]) + int(result[3]), change.check_units, moment)
        raise error
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
    return int(rows.aggregate(total=Sum("units"))["total"] or 0)


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
            raise exceeded(rule, before_units, change.check_units, moment)
        statuses.append(_status(rule, before_units, after, moment))
    return Decision(allowed=True, statuses=tuple(statuses))


def decide_exclusively(
    context: TenantContext,
    rules: Sequence[QuotaRule],
    change: Change,
    using: str,
    *,
    enforce: bool = True,
    token: str | None = None,
    used_written: bool = True,
) -> Decision:
    """``decide`` for a caller that holds the tree lock exclusively: missing counters are rebuilt on the spot.

    No writer can be in flight, so rebuilding here is exact however often Redis is lost meanwhile.
    """
    for _ in range(50):
        try:
            return decide(context, rules, change, using, enforce=enforce, token=token, used_written=used_written)
        except NeedsRebuild as missing:
            rebuild(context, missing.rules, missing.change.moment, locked=True, pending=change)
    raise RuntimeError("Redis keeps losing the quota counters")  # pragma: no cover


def rebuild(
    context: TenantContext,
    rules: Sequence[QuotaRule],
    moment: datetime,
    *,
    locked: bool = False,
    pending: Change | None = None,
) -> None:
    """Set every counter the rules need from the database, with the tree locked exclusively.

    ``locked``: the caller's transaction already holds the tree lock exclusively and has already written
    ``pending`` (its fact, rollups or reservation rows), which the database sums therefore include: it is left out
    of the counters here, because the decision that follows adds it.
    """
    redis = use_redis()
    if redis is None:
        return
    using = metering_settings.DATABASE_ALIAS
    root = context.root.pk
    ttl = int(metering_settings.COUNTER_TTL_SECONDS)
    with transaction.atomic(using=using):
        if not locked:
            lock_trees([root], exclusive=True, using=using)
        values: dict[str, int] = {}
        for rule in rules:
            start, end = rule.window(moment)
            used_key = counters.key(root, rule.level.pk, rule.feature, rule.period, start, counters.USED)
            reserved_key = counters.key(root, rule.level.pk, rule.feature, rule.period, start, counters.RESERVED)
            values[used_key] = rollups.sum_units(rule.level.pk, rule.feature, start, end, using=using)
            values[reserved_key] = reserved_units(rule.level_path, rule.feature, start, end, using)
            if pending is not None:
                if pending.used_at is not None and rule.window(pending.used_at)[0] == start:
                    values[used_key] -= pending.used_delta
                if pending.reserved_at is not None and rule.window(pending.reserved_at)[0] == start:
                    values[reserved_key] -= pending.reserved_delta
        pipe = redis.pipeline(transaction=False)
        for key, value in values.items():
            pipe.set(key, value, ex=ttl)
        pipe.execute()
