"""``QuotaExceeded``: which level blocked, what it allows, what was used and asked, and when it resets.

Python callers get every detail. HTTP answers (``quotas.http``) show them only to a caller whose credential covers
the blocking level; a refusal by a level above it is rendered with ``upstream_dict``: that an upstream quota refused,
and when it resets.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from metering.events import utcnow
from metering.exceptions import AnswerableError, ErrorAnswer


class QuotaExceeded(AnswerableError):
    """A hard quota at some level of the lineage has no room for the request. Nothing was consumed.

    In a DRF view, metering's exception handler answers it as the 429 of ``api_answer`` (``quotas.http``)."""

    code = "quota_exceeded"

    def __init__(
        self,
        *,
        tenant_id: str,
        feature: str,
        limit: Decimal,
        used: Decimal,
        requested: Decimal,
        period: str,
        reset_at: datetime | None,
    ) -> None:
        super().__init__(
            f"quota exceeded at {tenant_id!r}: {feature} {used} used + {requested} requested > {limit} per {period}"
        )
        self.tenant_id = tenant_id
        self.feature = feature
        self.limit = limit
        self.used = used
        self.requested = requested
        self.period = period
        self.reset_at = reset_at

    @property
    def retry_after(self) -> int | None:
        """Whole seconds until the blocking window resets; ``None`` for a ``total`` quota (it never resets)."""
        if self.reset_at is None:
            return None
        return max(1, math.ceil((self.reset_at - utcnow()).total_seconds()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": str(self),
            "tenant": self.tenant_id,
            "feature": self.feature,
            "period": self.period,
            "limit": str(self.limit),
            "used": str(self.used),
            "requested": str(self.requested),
            "reset": self.reset_at.isoformat() if self.reset_at else None,
        }

    def api_answer(self, request: Any) -> ErrorAnswer:
        from .http import api_answer  # the HTTP face imports this module

        return api_answer(self, request)

    def upstream_dict(self) -> dict[str, Any]:
        """The refusal as a caller below the blocking level may learn it: the caller's own request and the reset
        time (so it knows when to retry), never the level's tenant id, limit, usage, room or period name."""
        return {
            "code": self.code,
            "scope": "upstream",
            "message": UPSTREAM_MESSAGE,
            "feature": self.feature,
            "requested": str(self.requested),
            "reset": self.reset_at.isoformat() if self.reset_at else None,
            "retry_after": self.retry_after,
        }


UPSTREAM_MESSAGE = "an upstream quota refused this request"


class QuotaConfigurationError(Exception):
    """Quotas need an adapter that stores facts in this database (``DatabaseMeteringAdapter`` or a subclass)."""


# A reservation holds quota at every level of the lineage until it ends: longer than a day is a leak, not a hold.
MAX_RESERVATION_TTL = timedelta(days=1)


class InvalidReservationTtl(ValueError):
    """``reserve(ttl=...)`` is not a ``datetime.timedelta`` above zero and at most ``MAX_RESERVATION_TTL``."""

    code = "invalid_ttl"
    field = "ttl"


def validate_reservation_ttl(ttl: object) -> timedelta:
    """``ttl`` if it is a ``timedelta`` with ``0 < ttl <= MAX_RESERVATION_TTL``; else ``InvalidReservationTtl``."""
    if not isinstance(ttl, timedelta):
        raise InvalidReservationTtl(f"ttl must be a datetime.timedelta, got {type(ttl).__name__}")
    if not timedelta(0) < ttl <= MAX_RESERVATION_TTL:
        raise InvalidReservationTtl(f"ttl must be above 0 and at most {MAX_RESERVATION_TTL}, got {ttl}")
    return timedelta(days=ttl.days, seconds=ttl.seconds, microseconds=ttl.microseconds)
