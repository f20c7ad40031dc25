"""The quotas that apply to a lineage and a feature, cached in each process, and never used once a limit of the
tree changed.

``ruleset`` keeps them in this process's memory, with no round trip at all. Each entry carries the tree's counter
epoch (``metering.counters``) it was read under. Saving or deleting a limit bumps its tree's epoch in the same
transaction (``QuotaLimit.save``), and every decision reads the tree's current epoch in the statement it sends
anyway: an entry of another epoch is reloaded. So from the commit of a change on, no decision in any process uses
the older limits — whatever the cache backend (none is involved), with Redis, without it, or with a Redis restored
from an old backup. The epoch is read *before* the limits, so an entry can only be newer than its epoch, never
older. ``rules_for`` (reads: entitlements) does the same with the epoch read on its own (one primary-key lookup).
Limits must therefore change through the model (admin, API, ``quota set``), never ``QuerySet.update``, which bumps
nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from metering import counters
from metering.conf import metering_settings
from metering.events import units_to_quantity
from metering.windows import Period, window
from tenants import namespace
from tenants.context import TenantContext, TenantRef

from .models import QuotaLimit, limit_to_units

logger = logging.getLogger("quotas.rules")
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
    return f"{tenant_pk}:{feature}"


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules of one lineage and feature, and the tree's counter epoch they were read under."""

    rules: tuple[QuotaRule, ...]
    epoch: int
    loaded_at: float = 0.0


LOCAL_MAX_ENTRIES = 10_000
# Keyed by the site too: a process may serve several databases (epoch 0 is every tree's epoch before its first bump).
_local: dict[tuple[str, tuple[TenantRef, ...], str], RuleSet] = {}


def ruleset(context: TenantContext, feature: str, epoch: int) -> RuleSet:
    """The rules for a decision whose statement read the tree's ``epoch`` (see the module), from this process's
    memory when they were read under that epoch, else from the database."""
    entry = (namespace.current().hash, context.lineage, feature)
    now = time.monotonic()
    cached = _local.get(entry)
    # The age bounds memory only; exactness comes from the epoch.
    if cached is not None and cached.epoch == epoch and now - cached.loaded_at < CACHE_TIMEOUT:
        return cached
    rows = _load(feature, [level.pk for level in context.lineage])
    loaded = RuleSet(tuple(_from_rows(context, feature, rows)), epoch, now)
    if epoch == counters.NOT_OURS:
        return loaded  # not a generation this process may trust its memory with: read every time
    if len(_local) >= LOCAL_MAX_ENTRIES:
        _local.clear()
    _local[entry] = loaded
    return loaded


def forget_local() -> None:
    """Empty this process's rule cache (tests; the epochs make it unnecessary otherwise)."""
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
    """Active quotas on ``feature`` at every level of the lineage, root first, as of the tree's current epoch (one
    primary-key lookup; the limits themselves only when they changed since this process last read them)."""
    using = metering_settings.DATABASE_ALIAS
    return list(ruleset(context, feature, counters.current_epoch(context.root.pk, using)).rules)


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
    """Forget this process's cached rules (after commit; other processes see the change through the tree's epoch,
    which the change bumped)."""
    _local.clear()
