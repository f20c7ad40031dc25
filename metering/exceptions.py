"""Named errors of metering. Bad input is an ``InvalidUsageEvent`` (a ``ValueError``) naming its ``field``."""

from __future__ import annotations

from tenants.exceptions import InactiveTenant, TenantError, UnknownTenant

__all__ = [
    "DuplicateUsageEvent",
    "InactiveTenant",
    "InvalidFeatureName",
    "InvalidMetadata",
    "InvalidPeriod",
    "InvalidQuantity",
    "InvalidTimestamp",
    "InvalidTransactionId",
    "InvalidUsageEvent",
    "MeteringError",
    "TenantError",
    "UnknownTenant",
]


class MeteringError(Exception):
    """Base of every metering error."""


class InvalidUsageEvent(MeteringError, ValueError):
    """A usage event was refused; nothing was stored. ``field`` names the culprit, ``code`` is stable."""

    code = "invalid"
    field = "event"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class InvalidQuantity(InvalidUsageEvent):
    """Negative, NaN, infinite, non-numeric, too precise or absurdly large."""

    code = "invalid_quantity"
    field = "quantity"


class InvalidTimestamp(InvalidUsageEvent):
    """Not a datetime, naive (no timezone), or in the future beyond the tolerance."""

    code = "invalid_timestamp"
    field = "timestamp"


class InvalidFeatureName(InvalidUsageEvent):
    code = "invalid_feature_name"
    field = "feature_name"


class InvalidMetadata(InvalidUsageEvent):
    """Not a JSON object of JSON values, or larger than ``MAX_METADATA_BYTES``."""

    code = "invalid_metadata"
    field = "metadata"


class InvalidTransactionId(InvalidUsageEvent):
    code = "invalid_transaction_id"
    field = "transaction_id"


class InvalidPeriod(InvalidUsageEvent):
    """A usage query with a naive time, or an end before its start."""

    code = "invalid_period"
    field = "start_time"


class DuplicateUsageEvent(MeteringError):
    """This tenant already recorded an event with this ``transaction_id``; it was counted once, not again."""

    code = "duplicate"

    def __init__(self, tenant_id: str, transaction_id: str, record_id: int | None = None) -> None:
        super().__init__(f"tenant {tenant_id!r} already recorded transaction_id {transaction_id!r}")
        self.tenant_id = tenant_id
        self.transaction_id = transaction_id
        self.record_id = record_id
