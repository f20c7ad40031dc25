"""Quota usage for people: used / limit in the quota's current window, and a bar coloured at the warning thresholds.

Usage is read from the hourly rollups (exact: they are written in each fact's transaction), for many quotas at once
in at most one query per period, so listings stay a constant number of queries per page. Reservations held for
work in progress are not included: the bar shows what was recorded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.utils.html import format_html
from django.utils.safestring import SafeString

from metering.events import utcnow
from metering.usage import usage_by_tenant_and_feature
from metering.windows import Period

from .models import QuotaLimit

# ``over``: a hard quota with no room for one more unit (it refuses); ``beyond``: a soft quota past its limit (it
# records and warns, it does not refuse).
COLOURS = {"ok": "#2e7d32", "warn": "#e09400", "over": "#c62828", "beyond": "#ef6c00", "inactive": "#9e9e9e"}
TAGS = {"over": "refused", "beyond": "over soft limit"}
PERIOD_LABELS = {"hour": "this hour", "day": "today", "month": "this month", "total": "in total"}


def number(value: Decimal) -> str:
    """``1234.5`` as ``1,234.5``: exact, with thousands separators, never in exponent form."""
    return f"{value.normalize():,f}"


def plain(value: Decimal) -> str:
    """``2000``, not ``2E+3``: for machine-readable attributes."""
    return f"{value.normalize():f}"


@dataclass(frozen=True)
class QuotaUsage:
    feature: str
    period: str
    used: Decimal
    limit: Decimal
    thresholds: tuple[int, ...]
    active: bool = True
    hard: bool = True

    @property
    def percent(self) -> Decimal:
        """Used as a percentage of the limit (a limit of 0 is full: it blocks everything)."""
        if self.limit <= 0:
            return Decimal(100)
        return self.used * 100 / self.limit

    @property
    def level(self) -> str:
        """``ok`` below the first warning threshold, ``warn`` from it; ``over`` when a hard quota has no room left
        for one more unit (the next request of 1 is refused: 1,519.5 of 1,520 is refused, not amber), ``beyond``
        when a soft quota reached its limit; or ``inactive``."""
        if not self.active:
            return "inactive"
        if self.hard and self.limit - self.used < 1:
            return "over"
        percent = self.percent
        if not self.hard and percent >= 100:
            return "beyond"
        if any(percent >= threshold for threshold in self.thresholds):
            return "warn"
        return "ok"

    @property
    def summary(self) -> str:
        return (
            f"{self.feature} {PERIOD_LABELS.get(self.period, self.period)}: {number(self.used)} of "
            f"{number(self.limit)} ({self.percent:.0f}%)"
            f"{'' if self.hard else ', soft'}{'' if self.active else ', inactive'}"
        )


def usage_of_quotas(quotas: Iterable[QuotaLimit], at: datetime | None = None) -> dict[int, QuotaUsage]:
    """Usage of each saved quota's subtree in its current window, by quota pk. At most one query per period."""
    at = at or utcnow()
    quotas = [quota for quota in quotas if quota.pk is not None]
    tenants_by_period: dict[str, set[int]] = defaultdict(set)
    for quota in quotas:
        tenants_by_period[quota.period].add(quota.tenant_id)
    used: dict[str, dict[int, dict[str, Decimal]]] = {
        period: usage_by_tenant_and_feature(sorted(pks), _period(period), at)
        for period, pks in tenants_by_period.items()
    }
    return {
        quota.pk: quota_usage(quota, used[quota.period].get(quota.tenant_id, {}).get(quota.feature, Decimal(0)))
        for quota in quotas
    }


def quota_usage(quota: QuotaLimit, used: Decimal) -> QuotaUsage:
    return QuotaUsage(
        feature=quota.feature,
        period=quota.period,
        used=used,
        limit=Decimal(quota.limit),
        thresholds=tuple(sorted(t for t in (quota.warning_thresholds or []) if isinstance(t, int))),
        active=quota.is_active,
        hard=quota.enforcement != QuotaLimit.Enforcement.SOFT,
    )


def period_usage(tenant_pk: int, period: str, at: datetime) -> dict[str, Decimal]:
    """Every feature's usage of one tenant's subtree in the ``period`` window holding ``at``. One query."""
    return usage_by_tenant_and_feature([tenant_pk], _period(period), at).get(tenant_pk, {})


def _period(value: str) -> Period:
    if value not in ("hour", "day", "month", "total"):
        raise ValueError(f"unknown period {value!r}")
    return value  # type: ignore[return-value]


def usage_bar(usage: QuotaUsage, *, compact: bool = False, label: str = "") -> SafeString:
    """A server-rendered bar (no script): ``role="meter"`` with the exact numbers in its accessible text.

    Hard quotas are drawn with a solid border, soft ones with a dashed border and a "soft" tag; a refusing quota is
    tagged "refused"."""
    percent = usage.percent
    width = min(percent, Decimal(100))
    text = f"{number(usage.used)} / {number(usage.limit)} ({percent:.0f}%)"
    tags = [] if usage.hard else ["soft"]
    if usage.level in TAGS:
        tags.append(TAGS[usage.level])
    return format_html(
        '<span class="xaas-usage xaas-usage--{level} xaas-usage--{enforcement}" data-level="{level}" '
        'data-enforcement="{enforcement}" data-used="{used}" data-limit="{limit}" '
        'data-percent="{percent}" title="{summary}" style="white-space:nowrap">{label}'
        '<span role="meter" aria-valuemin="0" aria-valuemax="{limit}" aria-valuenow="{now}" '
        'aria-valuetext="{summary}" aria-label="{feature} usage" '
        'style="display:inline-block;vertical-align:middle;width:{track}em;height:0.8em;background:#e3e3e3;'
        'border:1px {border} #757575;border-radius:3px;overflow:hidden">'
        '<span class="xaas-usage-fill" style="display:block;height:100%;width:{width}%;background:{colour}">'
        '</span></span> <span class="xaas-usage-text">{text}</span>{tag}</span>',
        enforcement="hard" if usage.hard else "soft",
        border="solid" if usage.hard else "dashed",
        tag=format_html(
            ' <span class="xaas-usage-tag" style="font-size:0.85em;font-weight:bold;color:{}">{}</span>',
            COLOURS[usage.level] if usage.level in TAGS else "#555",
            " · ".join(tags),
        )
        if tags
        else "",
        level=usage.level,
        used=plain(usage.used),
        limit=plain(usage.limit),
        percent=f"{percent:.1f}",
        summary=usage.summary,
        label=label,
        now=plain(min(usage.used, usage.limit)),
        feature=usage.feature,
        track=6 if compact else 9,
        width=f"{width:.1f}",
        colour=COLOURS[usage.level],
        text=text,
    )
