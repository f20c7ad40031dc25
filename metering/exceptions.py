"""Named errors of metering. Bad input is an ``InvalidUsageEvent`` (a ``ValueError``) naming its ``field``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tenants.exceptions import InactiveTenant, TenantError, UnknownTenant

__all__ = [
    "AnswerableError",
    "DuplicateUsageEvent",
    "ErrorAnswer",
    "InactiveTenant",
    "InvalidFeatureDefinition",
    "InvalidFeatureName",
    "InvalidMetadata",
    "InvalidPeriod",
    "InvalidQuantity",
    "InvalidTimestamp",
    "InvalidTransactionId",
    "InvalidUsageEvent",
    "LogStoreUnavailable",
    "MeteringError",
    "TenantError",
    "TimestampOutOfRange",
    "TooManyFeatures",
    "UnknownFeature",
    "UnknownTenant",
    "UsageTotalOutOfRange",
]


class MeteringError(Exception):
    """Base of every metering error."""


@dataclass(frozen=True)
class ErrorAnswer:
    """An API error answer: ``status``, the ``error`` object (``code``, ``field``, ``message`` and any detail keys,
    in that order) and the ``Retry-After`` seconds (``None``: no header)."""

    status: int
    error: dict[str, Any]
    retry_after: int | None = None


class AnswerableError(Exception):
    """An error that knows its own API answer, as seen by the caller of ``request``.

    The apps form a stack (tenants <- metering <- quotas): metering's exception handler (``metering.api.errors``)
    serves the quota endpoints and any DRF view of a project, so it must render ``quotas.QuotaExceeded`` (a 429)
    without importing it. A higher app's error subclasses this and answers for itself.
    """

    def api_answer(self, request: Any) -> ErrorAnswer:
        raise NotImplementedError


class InvalidUsageEvent(MeteringError, ValueError):
    """A usage event was refused; nothing was stored. ``field`` names the culprit, ``code`` is stable."""

    code = "invalid"
    field = "event"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field


class InvalidQuantity(InvalidUsageEvent):
    """Negative, NaN, infinite, not a number, not in the one quantity grammar (``"1_000"``, ``" 7 "``, ``"5e2"`` as
    a string, Unicode digits), more than 6 decimals, or above ``MAX_QUANTITY``."""

    code = "invalid_quantity"
    field = "quantity"


class InvalidTimestamp(InvalidUsageEvent):
    """Not a datetime, naive (no timezone), outside years 1-9999 once in UTC, before 1970-01-01 UTC, or in the
    future beyond the tolerance."""

    code = "invalid_timestamp"
    field = "timestamp"


class TimestampOutOfRange(InvalidTimestamp):
    """Older than ``MAX_BACKDATE`` or further ahead than ``MAX_FUTURE``, judged against the server's clock when the
    event is validated. Nothing was stored."""

    code = "timestamp_out_of_range"


class InvalidFeatureName(InvalidUsageEvent):
    """Empty, too long, or not letters, digits and ``_ . : -`` (the whole string: no trailing newline)."""

    code = "invalid_feature_name"
    field = "feature_name"


class UnknownFeature(InvalidFeatureName):
    """A valid name that is not in ``METERING['FEATURES']`` (the allowlist). Nothing was stored."""

    code = "unknown_feature"


class InvalidFeatureDefinition(InvalidUsageEvent):
    """A feature registry entry with a bad field (``field`` names it), or a change of an aggregation once saved."""

    code = "invalid_feature_definition"
    field = "aggregation"


class TooManyFeatures(InvalidFeatureName):
    """The fact would give its tree more than ``MAX_FEATURES_PER_TREE`` distinct feature names. Features the tree
    already has are still accepted. Nothing was stored."""

    code = "too_many_features"

    def __init__(self, message: str, *, root_pk: int | None = None, feature_name: str | None = None) -> None:
        super().__init__(message)
        self.root_pk = root_pk
        self.feature_name = feature_name


class InvalidMetadata(InvalidUsageEvent):
    """Not a JSON object of JSON values with string keys, NUL or a lone surrogate in a key or value, nested deeper
    than ``MAX_METADATA_DEPTH``, a non-finite number, or larger than ``MAX_METADATA_BYTES``."""

    code = "invalid_metadata"
    field = "metadata"


class InvalidTransactionId(InvalidUsageEvent):
    """Not 1-128 printable ASCII characters without spaces (the whole string: no trailing newline)."""

    code = "invalid_transaction_id"
    field = "transaction_id"


class InvalidPeriod(InvalidUsageEvent):
    """A usage query with a time that is not an aware datetime from 1970-01-01 to 9999-01-01 UTC, or an end before
    its start. ``field`` is ``start_time`` or ``end_time``."""

    code = "invalid_period"
    field = "start_time"


Problems = dict[str, list[tuple[str, str]]]  # field -> [(code, message)]


class InvalidBatch(InvalidUsageEvent):
    """Some events of a batch are invalid; nothing of the batch was stored.

    ``errors``: {index: {field: [message, ...]}}; ``codes``: the same with the stable codes; ``problems``: both,
    as {index: {field: [(code, message), ...]}}."""

    code = "validation_errors"
    field = "events"

    def __init__(self, problems: dict[int, Problems], count: int) -> None:
        first = min(problems)
        super().__init__(f"{len(problems)} of {count} event(s) are invalid (first: index {first}); nothing was stored")
        self.problems = problems
        self.count = count
        self.errors = {i: {f: [m for _, m in items] for f, items in p.items()} for i, p in problems.items()}
        self.codes = {i: {f: [c for c, _ in items] for f, items in p.items()} for i, p in problems.items()}


class DuplicateUsageEvent(MeteringError):
    """This tenant already recorded an event with this ``transaction_id``; it was counted once, not again."""

    code = "duplicate"

    def __init__(
        self, tenant_id: str, transaction_id: str, record_id: int | None = None, *, entry_id: str | None = None
    ) -> None:
        super().__init__(f"tenant {tenant_id!r} already recorded transaction_id {transaction_id!r}")
        self.tenant_id = tenant_id
        self.transaction_id = transaction_id
        self.record_id = record_id
        # Log mode: the stream entry holding the first one (``record_id`` is set once the drainer stored it).
        self.entry_id = entry_id


class UsageTotalOutOfRange(InvalidQuantity):
    """The fact would carry a level's hourly total beyond what the database stores exactly (2**63 - 1 units on
    SQLite; on PostgreSQL the rollup slot row it adds to would pass 10**36 - 1, so the hour's sum of slots never
    passes 10**38 - 1, see ``metering.rollups``). Refused, for this fact only; nothing was stored."""

    code = "usage_total_out_of_range"


try:  # a store error: the HTTP layer (``tenants.unavailable``) answers it with a JSON 503 and ``Retry-After``
    from redis.exceptions import ConnectionError as _RedisConnectionError
except ImportError:  # pragma: no cover (django-redis depends on redis)
    _RedisConnectionError = ConnectionError  # type: ignore[assignment,misc]


class LogStoreUnavailable(MeteringError, _RedisConnectionError):
    """Log mode (``METERING["WRITE_MODE"] = "log"``): Redis is unreachable, hung or not configured, so the write
    cannot be decided exactly; nothing was written. Over HTTP a JSON 503 with ``Retry-After``."""

    code = "service_unavailable"
