"""``UsageEvent``, the brief's unit of usage, and its validation into exact integer units.

Quantities are ``Decimal`` in the API and integers of 10**-6 units in storage and in Redis, so sums are exact on
every database (SQLite has no exact decimal type) and Redis counters never drift (INCRBYFLOAT would).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from .conf import metering_settings
from .exceptions import (
    InvalidFeatureName,
    InvalidMetadata,
    InvalidQuantity,
    InvalidTimestamp,
    InvalidTransactionId,
)

DECIMAL_PLACES = 6
UNIT = Decimal(10) ** -DECIMAL_PLACES
UNITS_PER_ONE = 10**DECIMAL_PLACES
FEATURE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")
TRANSACTION_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces

Quantity = Decimal | int | float | str


class JsonNumber(float):
    """A JSON number as written: ``json.loads(text, parse_float=JsonNumber)`` keeps the literal, so a quantity sent
    as ``1e-9999999`` or ``0.1234567`` is judged exactly as written (a plain float would round it), while metadata
    holding it still serializes as the float it is."""

    literal: str

    def __new__(cls, literal: str) -> JsonNumber:
        number = super().__new__(cls, literal)
        number.literal = literal
        return number


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class UsageEvent:
    """One usage fact: ``quantity`` of ``feature_name`` used by ``tenant_id`` at ``timestamp``.

    ``transaction_id`` is the idempotency key: the same one for the same tenant is stored once. When omitted,
    a random one is generated at recording time.
    """

    tenant_id: str
    feature_name: str
    quantity: Quantity
    timestamp: datetime = field(default_factory=utcnow)
    metadata: dict[str, Any] = field(default_factory=dict)
    transaction_id: str | None = None


@dataclass(frozen=True, slots=True)
class ValidEvent:
    """A ``UsageEvent`` that passed validation: exact units, aware UTC time, a transaction id."""

    tenant_id: str
    feature_name: str
    units: int
    timestamp: datetime
    metadata: dict[str, Any]
    transaction_id: str

    @property
    def quantity(self) -> Decimal:
        return units_to_quantity(self.units)


def quantity_to_units(value: object) -> int:
    """Exact integer units of a quantity. Raises ``InvalidQuantity``."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | float | str):
        raise InvalidQuantity(f"quantity must be a number, got {type(value).__name__}")
    if isinstance(value, JsonNumber):
        value = Decimal(value.literal)  # exact, whatever the float would have rounded it to
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidQuantity(f"quantity must be finite, got {value!r}")
        value = repr(value)  # the shortest decimal that round-trips, not the binary expansion
    try:
        quantity = Decimal(value.strip() if isinstance(value, str) else value)
    except (InvalidOperation, ValueError):
        raise InvalidQuantity(f"quantity must be a number, got {value!r}") from None
    if not quantity.is_finite():
        raise InvalidQuantity(f"quantity must be finite, got {value!r}")
    if quantity < 0:
        raise InvalidQuantity(f"quantity must not be negative, got {quantity}")
    if quantity > Decimal(metering_settings.MAX_QUANTITY):
        raise InvalidQuantity(f"quantity {quantity} exceeds the maximum of {metering_settings.MAX_QUANTITY}")
    scaled = quantity * UNITS_PER_ONE
    if scaled != scaled.to_integral_value():
        raise InvalidQuantity(f"quantity has more than {DECIMAL_PLACES} decimal places: {quantity}")
    return int(scaled)


def units_to_quantity(units: int) -> Decimal:
    """The exact quantity, without trailing zeros and never in exponent form (10, not 1E+1)."""
    quantity = (Decimal(units) / UNITS_PER_ONE).quantize(UNIT).normalize()
    return quantity if quantity.as_tuple().exponent <= 0 else quantity.quantize(Decimal(1))


def validate_feature_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidFeatureName("feature_name must be a non-empty string")
    if len(name) > metering_settings.MAX_FEATURE_NAME_LENGTH or not FEATURE_NAME_RE.match(name):
        raise InvalidFeatureName(
            f"feature_name must be at most {metering_settings.MAX_FEATURE_NAME_LENGTH} characters of letters, "
            f"digits and _ . : -, got {name!r}"
        )
    return name


def validate_timestamp(timestamp: object, *, now: datetime | None = None) -> datetime:
    if not isinstance(timestamp, datetime):
        raise InvalidTimestamp(f"timestamp must be a datetime, got {type(timestamp).__name__}")
    if timestamp.tzinfo is None or timestamp.utcoffset() is None:
        raise InvalidTimestamp("timestamp must be timezone-aware (naive datetimes are ambiguous)")
    timestamp = timestamp.astimezone(UTC)
    limit = (now or utcnow()) + timedelta(seconds=metering_settings.FUTURE_TOLERANCE_SECONDS)
    if timestamp > limit:
        raise InvalidTimestamp(f"timestamp {timestamp.isoformat()} is in the future")
    return timestamp


def validate_metadata(metadata: object) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(key, str) for key in metadata):
        raise InvalidMetadata("metadata must be a JSON object with string keys")
    try:
        encoded = json.dumps(metadata, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise InvalidMetadata(f"metadata must hold only JSON values: {error}") from None
    limit = metering_settings.MAX_METADATA_BYTES
    if len(encoded.encode()) > limit:
        raise InvalidMetadata(f"metadata is larger than {limit} bytes once encoded")
    loaded: dict[str, Any] = json.loads(encoded)
    return loaded


def validate_transaction_id(transaction_id: object) -> str:
    if transaction_id is None:
        return uuid.uuid4().hex
    if not isinstance(transaction_id, str) or not TRANSACTION_ID_RE.match(transaction_id):
        raise InvalidTransactionId("transaction_id must be 1-128 printable ASCII characters without spaces")
    return transaction_id


def validate_event(event: UsageEvent) -> ValidEvent:
    """Check every field of ``event``. Raises the ``InvalidUsageEvent`` subclass naming the first bad field."""
    if not isinstance(event, UsageEvent):
        raise TypeError(f"expected a UsageEvent, got {type(event).__name__}")
    from tenants.lineage import validate_tenant_id

    return ValidEvent(
        tenant_id=validate_tenant_id(event.tenant_id),
        feature_name=validate_feature_name(event.feature_name),
        units=quantity_to_units(event.quantity),
        timestamp=validate_timestamp(event.timestamp),
        metadata=validate_metadata(event.metadata),
        transaction_id=validate_transaction_id(event.transaction_id),
    )
