"""Usage metering: record every usage fact once, count it at every level of the tenant tree.

Public API::

    from metering import UsageEvent, MeteringProtocol, get_meter
    await get_meter().record_usage(UsageEvent("org-1", "llm_tokens", 120))
"""

from .events import UsageEvent
from .exceptions import (
    DuplicateUsageEvent,
    InactiveTenant,
    InvalidBatch,
    InvalidFeatureName,
    InvalidMetadata,
    InvalidPeriod,
    InvalidQuantity,
    InvalidTimestamp,
    InvalidTransactionId,
    InvalidUsageEvent,
    MeteringError,
    UnknownTenant,
)
from .meter import get_meter
from .protocol import BulkMeteringProtocol, MeteringProtocol

__all__ = [
    "BulkMeteringProtocol",
    "DuplicateUsageEvent",
    "InactiveTenant",
    "InvalidBatch",
    "InvalidFeatureName",
    "InvalidMetadata",
    "InvalidPeriod",
    "InvalidQuantity",
    "InvalidTimestamp",
    "InvalidTransactionId",
    "InvalidUsageEvent",
    "MeteringError",
    "MeteringProtocol",
    "UnknownTenant",
    "UsageEvent",
    "get_meter",
]
