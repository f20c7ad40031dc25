"""The quotas that apply to a lineage and a feature, cached per level and invalidated on commit of a change."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.core.cache import caches

from metering.conf import metering_settings
from metering.events import units_to_quantity
from metering.windows import Period, window
from tenants.context import TenantContext, TenantRef

from .models import QuotaLimit

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
        loaded: dict[int, list[tuple[Any, ...]]] = {pk: [] for pk in missing}
        for row in QuotaLimit.objects.filter(tenant_id__in=missing, feature=feature, is_active=True).values_list(
            "tenant_id", "id", "period", "limit", "enforcement", "warning_thresholds"
        ):
            loaded[row[0]].append(row[1:])
        fresh = {_key(pk, feature): rows for pk, rows in loaded.items()}
        cached.update(fresh)
        try:
            cache.set_many(fresh, CACHE_TIMEOUT)
        except Exception as error:
            logger.warning("quota rule cache unavailable: %s", type(error).__name__)
    from metering.events import quantity_to_units

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
                    limit_units=quantity_to_units(Decimal(limit)),
                    hard=enforcement == QuotaLimit.Enforcement.HARD,
                    thresholds=tuple(sorted(thresholds or ())),
                )
            )
    return rules


def invalidate(tenant_pk: int, feature: str) -> None:
    try:
        caches[metering_settings.CACHE_ALIAS].delete(_key(tenant_pk, feature))
    except Exception as error:
        logger.warning("quota rule cache unavailable: %s", type(error).__name__)
