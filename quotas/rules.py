"""The quotas that apply to a lineage and a feature, cached and invalidated on commit of a change.

Two caches:
- ``rules_for``: per level in the metering cache (one round trip when warm), for the database decision path and
  for reads;
- ``ruleset``: in this process, for the Redis decision path, with no round trip at all. Each entry carries the
  tree's *rules token*, a random value kept in Redis under the tree's hash tag; the decision script refuses to
  decide with a token that is no longer current, and the caller reloads (``ledger.StaleRules``). A change to any
  limit in the tree deletes the token on commit, so every process's entries for that tree go stale at once,
  and a lost Redis loses the token too. The token is read *before* the limits, so a change whose invalidation
  runs after the read always leaves the entry stale: once a change's on-commit invalidation has run, no decision
  uses the older limits. Limits must therefore change through the model (admin, API, ``quota set``), never
  ``QuerySet.update``, which sends no signal; should Redis be unreachable at that moment, entries still expire
  after ``CACHE_TIMEOUT``.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.core.cache import caches

from metering import counters
from metering.conf import metering_settings
from metering.events import units_to_quantity
from metering.windows import Period, window
from tenants.context import TenantContext, TenantRef

from .models import QuotaLimit, limit_to_units

logger = logging.getLogger("quotas.rules")
CACHE_PREFIX = "xaas:quota-rules:v1:"
CACHE_TIMEOUT = 300


@dataclass(frozen=True, slots=True)
class QuotaRule:
    quota_id: int
    level: TenantRef
    level_path: str
    feature: str
    period: Period
    limit_units: int
    hard: bool
    thresholds: tuple[int, ...]

    @property
    def limit(self) -> Decimal:
        return units_to_quantity(self.limit_units)

    def window(self, moment: datetime) -> tuple[datetime | None, datetime | None]:
        return window(self.period, moment)


def _key(tenant_pk: int, feature: str) -> str:
    return f"{CACHE_PREFIX}{tenant_pk}:{feature}"


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules of one lineage and feature, and the tree's rules token they were read under (``None``: no Redis)."""

    rules: tuple[QuotaRule, ...]
    token: str | None = None
    loaded_at: float = 0.0


LOCAL_MAX_ENTRIES = 10_000
_local: dict[tuple[tuple[TenantRef, ...], str], RuleSet] = {}


def token_key(root_pk: int) -> str:
    return f"{counters.tree_tag(root_pk)}:rules"


def ruleset(context: TenantContext, feature: str, redis: Any, *, refresh: bool = False) -> RuleSet:
    """The rules for the Redis decision path, from this process's memory unless ``refresh`` (see the module)."""
    entry = (context.lineage, feature)
    now = time.monotonic()
    if not refresh:
        cached = _local.get(entry)
        # The age limit bounds staleness should an invalidation ever fail to reach Redis.
        if cached is not None and now - cached.loaded_at < CACHE_TIMEOUT:
            return cached
    token = current_token(redis, context.root.pk)
    rows = _load(feature, [level.pk for level in context.lineage])
    loaded = RuleSet(tuple(_from_rows(context, feature, rows)), token, now)
    if len(_local) >= LOCAL_MAX_ENTRIES:
        _local.clear()
    _local[entry] = loaded
    return loaded


def current_token(redis: Any, root_pk: int) -> str:
    """The tree's rules token, created if missing. Never ``None``: a decision without one would not see changes."""
    key = token_key(root_pk)
    for _ in range(10):
        token = redis.get(key)
        if token is not None:
            return str(token.decode() if isinstance(token, bytes) else token)
        fresh = secrets.token_hex(8)
        if redis.set(key, fresh, nx=True):
            return fresh
        # Another process created it, and it was deleted again before we read it (a limit change): read again.
    raise counters.RedisError("the quota rules token keeps disappearing")


def forget_local() -> None:
    """Empty this process's rule cache (tests; the tokens make it unnecessary otherwise)."""
    _local.clear()


def _load(feature: str, tenant_pks: list[int]) -> dict[str, list[tuple[Any, ...]]]:
    loaded: dict[int, list[tuple[Any, ...]]] = {pk: [] for pk in tenant_pks}
    limits = QuotaLimit.objects.using(metering_settings.DATABASE_ALIAS)
    for row in limits.filter(tenant_id__in=tenant_pks, feature=feature, is_active=True).values_list(
        "tenant_id", "id", "period", "limit", "enforcement", "warning_thresholds"
    ):
        loaded[row[0]].append(row[1:])
    return {_key(pk, feature): rows for pk, rows in loaded.items()}


def rules_for(context: TenantContext, feature: str) -> list[QuotaRule]:
    """Active quotas on ``feature`` at every level of the lineage, root first. One cache round trip when warm."""
    cache = caches[metering_settings.CACHE_ALIAS]
    keys = [_key(level.pk, feature) for level in context.lineage]
    try:
        cached: dict[str, Any] = cache.get_many(keys)
    except Exception as error:  # an unreachable cache degrades to the database
        logger.warning("quota rule cache unavailable: %s", type(error).__name__)
        cached = {}
    missing = [level.pk for level in context.lineage if _key(level.pk, feature) not in cached]
    if missing:
        fresh = _load(feature, missing)
        cached.update(fresh)
        try:
            cache.set_many(fresh, CACHE_TIMEOUT)
        except Exception as error:
            logger.warning("quota rule cache unavailable: %s", type(error).__name__)
    return _from_rows(context, feature, cached)


def _from_rows(context: TenantContext, feature: str, cached: dict[str, Any]) -> list[QuotaRule]:
    rules = []
    path = "/"
    for level in context.lineage:
        path += f"{level.pk}/"
        for quota_id, period, limit, enforcement, thresholds in cached[_key(level.pk, feature)]:
            rules.append(
                QuotaRule(
                    quota_id=quota_id,
                    level=level,
                    level_path=path,
                    feature=feature,
                    period=period,
                    limit_units=limit_to_units(Decimal(limit)),
                    hard=enforcement == QuotaLimit.Enforcement.HARD,
                    thresholds=tuple(sorted(thresholds or ())),
                )
            )
    return rules


def invalidate(tenant_pk: int, feature: str) -> None:
    """Forget the cached rules of ``tenant_pk`` (every process's, through the tree's rules token). After commit."""
    try:
        caches[metering_settings.CACHE_ALIAS].delete(_key(tenant_pk, feature))
    except Exception as error:
        logger.warning("quota rule cache unavailable: %s", type(error).__name__)
    _local.clear()
    redis = counters.client()
    if redis is None:
        return
    from tenants.models import Tenant

    tenants = Tenant.objects.using(metering_settings.DATABASE_ALIAS)
    path = tenants.filter(pk=tenant_pk).values_list("path", flat=True).first()
    if not path:
        return  # the tenant is gone: no lineage can reach its rules any more
    try:
        redis.delete(token_key(int(path.strip("/").split("/")[0])))
    except counters.RedisError as error:
        # The decision script would keep accepting this process's peers' old rules: say so loudly.
        logger.error("could not invalidate the quota rules of tenant %s: %s", tenant_pk, type(error).__name__)
