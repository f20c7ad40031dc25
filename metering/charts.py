"""Daily usage of a tenant's subtree over the last days, drawn as a server-rendered SVG bar chart (no script, no CDN).

The daily totals come from the hourly rollups in one query for every feature; the geometry is computed here and
drawn by the ``xaas_metering/usage_chart.html`` template, so a host project can restyle it by overriding that file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from django.db import OperationalError
from django.db.models import Sum
from django.db.models.functions import TruncDate

from .conf import metering_settings
from .events import units_to_quantity, utcnow
from .models import UsageRollup

WIDTH, HEIGHT = 640, 190
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 14, 30
PLOT_WIDTH, PLOT_HEIGHT = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM


def daily_usage(tenant_pk: int, days: int = 30, now: datetime | None = None) -> dict[str, dict[date, Decimal]]:
    """Per feature, the subtree's usage on each UTC day of the last ``days`` days (today included). One query."""
    today = (now or utcnow()).astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    start = datetime.combine(first, time(), tzinfo=UTC)
    end = datetime.combine(today + timedelta(days=1), time(), tzinfo=UTC)
    hours = UsageRollup.objects.using(metering_settings.DATABASE_ALIAS).filter(
        tenant_id=tenant_pk, bucket__gte=start, bucket__lt=end
    )
    # Every slot row of every hour of the day, summed.
    rows = hours.annotate(day=TruncDate("bucket", tzinfo=UTC)).values_list("feature", "day")
    try:
        sums = list(rows.annotate(units=Sum("units")).order_by())
    except OperationalError as error:  # SQLite: a day's sum past 64 bits; add the rows up in Python, exactly
        if "integer overflow" not in str(error):
            raise
        totals: dict[tuple[str, date], int] = {}
        for feature, day, units in rows.values_list("feature", "day", "units").iterator():
            totals[(feature, day)] = totals.get((feature, day), 0) + int(units)
        sums = [(feature, day, units) for (feature, day), units in totals.items()]
    result: dict[str, dict[date, Decimal]] = {}
    for feature, day, units in sums:
        result.setdefault(feature, {})[day] = units_to_quantity(int(units or 0))
    return result


def nice_ceiling(value: Decimal) -> Decimal:
    """The smallest 1, 2, 2.5 or 5 x 10^k at or above ``value`` (1 for nothing), so the axis reads well."""
    if value <= 0:
        return Decimal(1)
    exponent = math.floor(math.log10(value))
    for step in (1, 2, Decimal("2.5"), 5, 10):
        candidate = Decimal(step) * Decimal(10) ** exponent
        if candidate >= value:
            return candidate.normalize()
    return (Decimal(10) ** (exponent + 1)).normalize()  # pragma: no cover


def number(value: Decimal) -> str:
    """``1234.5`` as ``1,234.5``: exact, with thousands separators, never in exponent form."""
    return f"{value.normalize():,f}"


def _short(value: Decimal) -> str:
    """Axis labels: 1.5k, 2M."""
    for size, suffix in ((Decimal(10) ** 9, "G"), (Decimal(10) ** 6, "M"), (Decimal(10) ** 3, "k")):
        if abs(value) >= size:
            return f"{(value / size).quantize(Decimal('0.1')).normalize():f}{suffix}"
    return f"{value.normalize():f}"


@dataclass
class Bar:
    day: date
    quantity: Decimal
    x: float
    y: float
    width: float
    height: float

    @property
    def label(self) -> str:
        return f"{self.day:%a %d %b %Y}: {number(self.quantity)}"

    @property
    def plain_quantity(self) -> str:
        return f"{self.quantity.normalize():f}"


@dataclass
class Tick:
    y: float
    label: str


@dataclass
class Chart:
    feature: str
    slug: str
    days: int
    bars: list[Bar]
    total: Decimal
    peak: Decimal
    axis_max: Decimal
    ticks: list[Tick]
    x_labels: list[tuple[float, str]]
    daily_limit: Decimal | None = None
    limit_y: float | None = None
    width: int = WIDTH
    height: int = HEIGHT
    plot: dict[str, float] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.feature} per day, last {self.days} days"

    @property
    def description(self) -> str:
        text = f"Total {number(self.total)}; busiest day {number(self.peak)}."
        if self.daily_limit is not None:
            text += f" Daily limit {number(self.daily_limit)}."
        return text

    @property
    def plain_total(self) -> str:
        return f"{self.total.normalize():f}"

    @property
    def limit_label(self) -> str:
        return f"daily limit {number(self.daily_limit)}" if self.daily_limit is not None else ""


def build_chart(
    feature: str,
    per_day: dict[date, Decimal],
    *,
    days: int = 30,
    now: datetime | None = None,
    daily_limit: Decimal | None = None,
    index: int = 0,
) -> Chart:
    """The geometry of one feature's bar chart: one bar per day, oldest on the left, today on the right."""
    today = (now or utcnow()).astimezone(UTC).date()
    span = [today - timedelta(days=offset) for offset in range(days - 1, -1, -1)]
    values = [per_day.get(day, Decimal(0)) for day in span]
    peak = max(values, default=Decimal(0))
    axis_max = nice_ceiling(max(peak, daily_limit or Decimal(0)))
    slot = PLOT_WIDTH / days
    bars = []
    for position, (day, value) in enumerate(zip(span, values, strict=True)):
        height = float(value / axis_max) * PLOT_HEIGHT if value > 0 else 0.0
        bars.append(
            Bar(
                day=day,
                quantity=value,
                x=round(LEFT + position * slot + slot * 0.1, 2),
                y=round(TOP + PLOT_HEIGHT - height, 2),
                width=round(slot * 0.8, 2),
                height=round(height, 2),
            )
        )
    ticks = [
        Tick(y=round(TOP + PLOT_HEIGHT - PLOT_HEIGHT * fraction, 2), label=_short(axis_max * Decimal(fraction)))
        for fraction in (0, 0.5, 1)
    ]
    x_labels = [
        (round(LEFT + position * slot + slot / 2, 2), f"{span[position]:%d %b}")
        for position in sorted({0, days // 2, days - 1})
    ]
    limit_y = None
    if daily_limit is not None:
        limit_y = round(TOP + PLOT_HEIGHT - float(daily_limit / axis_max) * PLOT_HEIGHT, 2)
    return Chart(
        feature=feature,
        slug=f"{index}-{re.sub(r'[^A-Za-z0-9_-]', '-', feature)}",
        days=days,
        bars=bars,
        total=sum(values, Decimal(0)),
        peak=peak,
        axis_max=axis_max,
        ticks=ticks,
        x_labels=x_labels,
        daily_limit=daily_limit,
        limit_y=limit_y,
        plot={"left": LEFT, "right": WIDTH - RIGHT, "top": TOP, "bottom": TOP + PLOT_HEIGHT},
    )


def tenant_charts(
    tenant_pk: int,
    *,
    features: set[str] | frozenset[str] = frozenset(),
    daily_limits: dict[str, Decimal] | None = None,
    days: int = 30,
    now: datetime | None = None,
) -> list[Chart]:
    """A chart for every feature used in the last ``days`` days, plus ``features`` (e.g. those with quotas)."""
    now = now or utcnow()
    usage = daily_usage(tenant_pk, days, now)
    limits = daily_limits or {}
    return [
        build_chart(feature, usage.get(feature, {}), days=days, now=now, daily_limit=limits.get(feature), index=i)
        for i, feature in enumerate(sorted(set(usage) | set(features)))
    ]
