"""Request rate per API key: ``METERING['API_RATE']`` (default ``"6000/min"``; ``None``: no throttle).

Keyed by the API key (its prefix), not by the client's address: one key behind many addresses is one caller, and
many keys behind one NAT are many. Counted in the metering cache (``METERING['CACHE_ALIAS']``): on Redis every
process shares the count; on a per-process cache (local memory, Django's default) each process counts for itself,
so N processes admit up to N times the rate.

A sliding window over two fixed windows (the previous one weighted by how much of it still overlaps the last
period): two cache round trips per request and constant memory per key, where DRF's ``SimpleRateThrottle`` keeps
one timestamp per request (6,000 of them, read and rewritten on every call). Refused requests are not counted, so
a caller that waits ``Retry-After`` gets in. Should the cache fail, the request is let through (logged): this is
abuse protection, not accounting, and every write path has its own exact bounds.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

from django.core.cache import caches
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from metering.conf import metering_settings
from tenants import namespace
from tenants.authentication import TenantPrincipal

logger = logging.getLogger("metering.api")

PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400}
PERIODS["day"] = 86400
_RATE_RE = re.compile(r"([1-9][0-9]{0,9})/([a-z]+)")


def parse_rate(rate: object) -> tuple[int, int] | None:
    """``"6000/min"`` as ``(6000, 60)``; ``None`` as ``None``. Raises ``ValueError`` for anything else."""
    if rate is None:
        return None
    match = _RATE_RE.fullmatch(rate) if isinstance(rate, str) else None
    if match is None or match.group(2) not in PERIODS:
        raise ValueError(
            f"must be None or '<requests>/<period>' with a period of {', '.join(sorted(PERIODS))}, got {rate!r}"
        )
    return int(match.group(1)), PERIODS[match.group(2)]


class ApiKeyRateThrottle(BaseThrottle):
    """At most ``API_RATE`` requests per API key; more is 429 ``throttled`` with ``Retry-After``."""

    scope = "xaas_api_key"

    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request: Request, view: Any) -> bool:
        rate = parse_rate(metering_settings.API_RATE)
        user = getattr(request, "user", None)
        if rate is None or not isinstance(user, TenantPrincipal):
            return True  # no key, no throttle: such a request is refused by authentication anyway
        limit, period = rate
        now = time.time()
        window = int(now // period)
        base = namespace.current().cache_key("throttle", user.api_key.prefix, period)  # per site on a shared Redis
        current_key, previous_key = f"{base}:{window}", f"{base}:{window - 1}"
        cache = caches[metering_settings.CACHE_ALIAS]
        try:
            counts = cache.get_many([current_key, previous_key])
            current, previous = int(counts.get(current_key, 0)), int(counts.get(previous_key, 0))
            overlap = 1 - (now - window * period) / period  # share of the previous window still in the last period
            if current + previous * overlap + 1 > limit:
                self._wait = self._wait_for(limit, period, now, window, current, previous)
                return False
            try:
                cache.incr(current_key)
            except ValueError:  # the window's first request (a race with another one just loses a count)
                if not cache.add(current_key, 1, timeout=2 * period + 1):
                    cache.incr(current_key)
        except Exception as error:
            logger.warning("API rate limit not applied: the cache failed (%s)", type(error).__name__)
        return True

    @staticmethod
    def _wait_for(limit: int, period: int, now: float, window: int, current: int, previous: int) -> float:
        """Seconds until one more request fits: the previous window's weight must fall, or this window end."""
        if current + 1 > limit or previous == 0:
            return (window + 1) * period - now
        # current + previous * (1 - t / period) + 1 <= limit  <=>  t >= period * (1 - (limit - current - 1) / previous)
        elapsed_needed = period * (1 - (limit - current - 1) / previous)
        return max(elapsed_needed - (now - window * period), 0.001)

    def wait(self) -> float | None:
        return None if self._wait is None else float(math.ceil(self._wait))
