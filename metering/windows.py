"""UTC calendar windows: ``hour``, ``day``, ``month`` and ``total``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

Period = Literal["hour", "day", "month", "total"]
PERIODS: tuple[Period, ...] = ("hour", "day", "month", "total")
WINDOWED_PERIODS: tuple[Period, ...] = ("hour", "day", "month")


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def ceil_hour(moment: datetime) -> datetime:
    floored = floor_hour(moment)
    return floored if floored == moment else floored + timedelta(hours=1)


def window(period: Period, moment: datetime) -> tuple[datetime | None, datetime | None]:
    """``[start, end)`` of the ``period`` window holding ``moment``; ``(None, None)`` for ``total``."""
    moment = moment.astimezone(UTC)
    if period == "hour":
        start = floor_hour(moment)
        return start, start + timedelta(hours=1)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if period == "month":
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = (
            start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        )
        return start, following
    if period == "total":
        return None, None
    raise ValueError(f"unknown period {period!r}; expected one of {', '.join(PERIODS)}")


def matching_period(start: datetime | None, end: datetime | None) -> Period | None:
    """The period whose window is exactly ``[start, end)``, if any (so it can be served from a counter)."""
    if start is None and end is None:
        return "total"
    if start is None or end is None:
        return None
    for period in WINDOWED_PERIODS:
        if window(period, start) == (start.astimezone(UTC), end.astimezone(UTC)):
            return period
    return None
