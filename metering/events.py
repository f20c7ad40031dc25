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
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from .conf import metering_settings
from .exceptions import (
    InvalidFeatureName,
    InvalidMetadata,
    InvalidQuantity,
    InvalidTimestamp,
    InvalidTransactionId,
    InvalidUsageEvent,
    TimestampOutOfRange,
    UnknownFeature,
)

DECIMAL_PLACES = 6
UNIT = Decimal(10) ** -DECIMAL_PLACES
UNITS_PER_ONE = 10**DECIMAL_PLACES
# Units are stored in signed 64-bit columns and Redis INCRBY counters: no single quantity may exceed this.
MAX_UNITS = 2**63 - 1
# Every pattern is matched with ``fullmatch``: ``$`` would accept a trailing newline ("llm_tokens\n").
FEATURE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
TRANSACTION_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
# A quantity written as a string: plain ASCII decimal, no sign, exponent, whitespace, "_" or Unicode digits.
QUANTITY_STRING_RE = re.compile(r"[0-9]+(?:\.[0-9]{1,6})?")
# A JSON number as RFC 8259 writes it (also what ``float.__repr__`` writes): judged by its exact value.
JSON_NUMBER_RE = re.compile(r"(-?)(0|[1-9][0-9]*)(?:\.([0-9]+))?(?:[eE]([+-]?)([0-9]+))?")
# Facts before the Unix epoch are refused: Lago and the counters' window ids count Unix seconds, and no real usage
# predates it. The upper bound keeps every window computation (the month after, the hour after) inside year 9999.
EARLIEST_TIMESTAMP = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIMESTAMP = datetime(9999, 1, 1, tzinfo=UTC)
# Metadata is stored as JSON (PostgreSQL jsonb): bounded nesting, so neither validation nor a later json.loads of
# the stored value can recurse without bound.
MAX_METADATA_DEPTH = 32

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


def _shown(value: object, limit: int = 40) -> str:
    """A short ``repr`` for messages: hostile input may be megabytes long, or an int too long to print."""
    try:
        text = repr(value)
    except ValueError:  # int -> str beyond sys.get_int_max_str_digits()
        return f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[:limit] + "..."


def max_quantity_problem(value: object) -> str | None:
    """Why ``value`` cannot be ``METERING['MAX_QUANTITY']``, or ``None`` (system check ``xaas_metering.E006``)."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        return f"must be an int, a Decimal or a decimal string, got {type(value).__name__}"
    try:
        maximum = Decimal(value)
    except (InvalidOperation, ValueError):
        return f"must be a number, got {_shown(value)}"
    if not maximum.is_finite() or maximum <= 0:
        return f"must be a positive finite number, got {_shown(value)}"
    if maximum > _LARGEST_MAX_QUANTITY:
        return (
            f"must be at most {_LARGEST_MAX_QUANTITY} (2**63 - 1 units of 10**-{DECIMAL_PLACES}: units are stored "
            f"in signed 64-bit integers), got {_shown(value)}"
        )
    return None


_LARGEST_MAX_QUANTITY = Decimal(MAX_UNITS).scaleb(-DECIMAL_PLACES)


def max_quantity_units() -> int:
    """``MAX_QUANTITY`` in units (rounded down to whole units). Raises ``ImproperlyConfigured`` if it is invalid."""
    value = metering_settings.MAX_QUANTITY
    problem = max_quantity_problem(value)
    if problem is not None:
        raise ImproperlyConfigured(f"METERING['MAX_QUANTITY'] {problem}")
    return int(Decimal(value).quantize(UNIT, rounding=ROUND_FLOOR).scaleb(DECIMAL_PLACES))


def _exact_units(negative: bool, digits: str, exponent: int, shown: str, maximum: int | None = None) -> int:
    """Units of ``(-1)**negative * int(digits) * 10**exponent``, decided on the digits and the exponent before any
    number is built: no Decimal context can round or underflow it (``1e-9999999`` is not 0), no huge int is made."""
    digits = digits.lstrip("0")
    if not digits:
        return 0  # exactly zero, whatever its sign or exponent
    significant = digits.rstrip("0")
    exponent += len(digits) - len(significant)
    if negative:
        raise InvalidQuantity(f"quantity must not be negative, got {shown}")
    scale = exponent + DECIMAL_PLACES  # units = int(significant) * 10**scale
    if scale < 0:
        raise InvalidQuantity(f"quantity has more than {DECIMAL_PLACES} decimal places: {shown}")
    maximum = max_quantity_units() if maximum is None else maximum
    if len(significant) + scale > len(str(maximum)) or int(significant) * 10**scale > maximum:
        raise InvalidQuantity(f"quantity {shown} exceeds the maximum of {units_to_quantity(maximum)}")
    return int(significant) * 10**scale


def _units_of_json_number(literal: str, shown: str, maximum: int | None = None) -> int:
    match = JSON_NUMBER_RE.fullmatch(literal)
    if match is None:
        raise InvalidQuantity(f"quantity must be a JSON number, got {shown}")
    sign, whole, fraction, exponent_sign, exponent_digits = match.groups(default="")
    exponent = 0
    if exponent_digits:
        # Beyond 18 digits the exponent outweighs any number of digits this process could hold: clamp it, so a
        # 10,000-digit exponent is neither parsed nor trusted.
        magnitude = int(exponent_digits) if len(exponent_digits.lstrip("0")) <= 18 else 10**18
        exponent = -magnitude if exponent_sign == "-" else magnitude
    return _exact_units(sign == "-", whole + fraction, exponent - len(fraction), shown, maximum)


def quantity_to_units(value: object, *, maximum_units: int | None = None) -> int:
    """Exact integer units of a quantity. Raises ``InvalidQuantity``.

    One grammar: a ``str`` is ASCII digits with an optional ``.`` and 1-6 more digits (no sign, whitespace, ``_``,
    exponent or Unicode digits); an ``int`` (not ``bool``) is at least 0; a ``float`` is finite, at least 0 and has
    at most 6 decimals as ``repr`` writes it; a ``Decimal`` is finite, at least 0 with at most 6 decimals; a
    ``JsonNumber`` is judged by its literal (``5e2`` is 500). Every kind is at most ``MAX_QUANTITY`` (or
    ``maximum_units``: a quota limit bounds a window's total, not one fact).
    """
    if isinstance(value, bool) or not isinstance(value, Decimal | int | float | str):
        raise InvalidQuantity(f"quantity must be a number, got {type(value).__name__}")
    if isinstance(value, str):
        match = QUANTITY_STRING_RE.fullmatch(value)
        if match is None:
            raise InvalidQuantity(
                f"quantity must be a finite decimal written as ASCII digits with an optional '.' and at most "
                f"{DECIMAL_PLACES} decimals (no sign, spaces, '_' or exponent), got {_shown(value)}"
            )
        whole, _, fraction = value.partition(".")
        return _exact_units(False, whole + fraction, -len(fraction), _shown(value), maximum_units)
    if isinstance(value, int):
        if value < 0:
            raise InvalidQuantity(f"quantity must not be negative, got {_shown(value)}")
        maximum = max_quantity_units() if maximum_units is None else maximum_units
        if value * UNITS_PER_ONE > maximum:  # a multiplication, never int -> str: 10**5000 is refused, not printed
            raise InvalidQuantity(f"quantity {_shown(value)} exceeds the maximum of {units_to_quantity(maximum)}")
        return int(value) * UNITS_PER_ONE
    if isinstance(value, JsonNumber):
        return _units_of_json_number(value.literal, _shown(value.literal), maximum_units)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidQuantity(f"quantity must be finite, got {value!r}")
        # The shortest decimal that round-trips, not the binary expansion (0.1 is 0.1).
        return _units_of_json_number(float.__repr__(value), float.__repr__(value), maximum_units)
    if not value.is_finite():
        raise InvalidQuantity(f"quantity must be finite, got {_shown(value)}")
    sign, digit_tuple, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    return _exact_units(bool(sign), "".join(map(str, digit_tuple)), exponent, _shown(value), maximum_units)


def units_to_quantity(units: int) -> Decimal:
    """The exact quantity, without trailing zeros and never in exponent form (10, not 1E+1), at any size: built
    from its digits, so no Decimal context (28 digits by default) can round it."""
    whole, fraction = divmod(abs(units), UNITS_PER_ONE)
    decimals = f"{fraction:0{DECIMAL_PLACES}d}".rstrip("0")
    return Decimal(f"{'-' if units < 0 else ''}{whole}{'.' + decimals if decimals else ''}")


def validate_feature_name(name: object) -> str:
    """``name`` if it is 1-``MAX_FEATURE_NAME_LENGTH`` ASCII letters, digits and ``_ . : -`` (not starting with
    ``. : -``). Raises ``InvalidFeatureName``."""
    if not isinstance(name, str) or not name:
        raise InvalidFeatureName("feature_name must be a non-empty string")
    if len(name) > metering_settings.MAX_FEATURE_NAME_LENGTH or not FEATURE_NAME_RE.fullmatch(name):
        raise InvalidFeatureName(
            f"feature_name must be at most {metering_settings.MAX_FEATURE_NAME_LENGTH} characters of letters, "
            f"digits and _ . : -, got {_shown(name)}"
        )
    return str(name)


def validate_recorded_feature(name: object) -> str:
    """``name`` if it is a valid feature name (``validate_feature_name``) that ``METERING['FEATURES']`` allows
    (``None``: any). Raises ``InvalidFeatureName`` or ``UnknownFeature``. Reading usage is not bound by it."""
    name = validate_feature_name(name)
    allowed = metering_settings.FEATURES
    # A set is O(1) here; a list is scanned (the system check asks for one or the other).
    if allowed is not None and name not in allowed:
        raise UnknownFeature(f"feature_name {name!r} is not one of METERING['FEATURES']")
    if metering_settings.FEATURE_REGISTRY != "open":
        from .features import check_recordable

        check_recordable(name)
    return name


def features_problem(value: object) -> str | None:
    """Why ``value`` cannot be ``METERING['FEATURES']``, or ``None``."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple | set | frozenset):
        return f"must be None or a list, tuple or set of feature names, got {type(value).__name__}"
    for name in value:
        try:
            validate_feature_name(name)
        except InvalidFeatureName as error:
            return f"holds an invalid feature name: {error}"
    return None


def utc_moment(moment: object, name: str, error: type[InvalidUsageEvent]) -> datetime:
    """``moment`` as a plain UTC ``datetime`` from ``EARLIEST_TIMESTAMP`` to ``LATEST_TIMESTAMP``; otherwise
    ``error`` naming ``name``. Never ``OverflowError``: ``datetime(1, 1, 1, tzinfo=+05:00)`` has no UTC year."""
    if not isinstance(moment, datetime):
        raise error(f"{name} must be a datetime, got {type(moment).__name__}", field=name)
    try:
        offset = moment.utcoffset()  # a hostile tzinfo may return anything, or raise
        utc = moment.astimezone(UTC) if offset is not None else None
    except (OverflowError, ValueError, TypeError):
        raise error(f"{name} {_shown(moment, 80)} is outside years 1-9999 once converted to UTC", field=name) from None
    if utc is None:
        raise error(f"{name} must be timezone-aware (naive datetimes are ambiguous)", field=name)
    if not EARLIEST_TIMESTAMP <= utc <= LATEST_TIMESTAMP:
        raise error(
            f"{name} {utc.isoformat()} is outside {EARLIEST_TIMESTAMP.isoformat()} .. {LATEST_TIMESTAMP.isoformat()}",
            field=name,
        )
    # A plain datetime: a subclass could compare, hash or print differently from what is stored.
    return datetime(utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second, utc.microsecond, tzinfo=UTC)


def duration_problem(value: object) -> str | None:
    """Why ``value`` cannot be a ``MAX_BACKDATE``/``MAX_FUTURE`` (a timedelta or seconds, above 0), or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, timedelta | int | float):
        return f"must be None, a timedelta or a number of seconds, got {type(value).__name__}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be finite, got {value!r}"
    try:
        seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    except OverflowError:
        return f"is too large: {_shown(value)}"
    if not seconds > 0:
        return f"must be above 0, got {_shown(value)}"
    return None


def _duration(key: str, value: object) -> timedelta | None:
    problem = duration_problem(value)
    if problem is not None:
        raise ImproperlyConfigured(f"METERING[{key!r}] {problem}")
    if value is None or isinstance(value, timedelta):
        return value
    assert isinstance(value, int | float)
    try:
        return timedelta(seconds=value)
    except OverflowError:  # beyond timedelta's 999,999,999 days: no bound a datetime can reach
        return None


def max_backdate() -> timedelta | None:
    """``METERING['MAX_BACKDATE']`` as a timedelta (``None``: back to 1970). ``ImproperlyConfigured`` if invalid."""
    return _duration("MAX_BACKDATE", metering_settings.MAX_BACKDATE)


def max_future() -> timedelta | None:
    """``METERING['MAX_FUTURE']`` (or, while it is ``None``, the older ``FUTURE_TOLERANCE_SECONDS``)."""
    if metering_settings.MAX_FUTURE is not None:
        return _duration("MAX_FUTURE", metering_settings.MAX_FUTURE)
    return _duration("FUTURE_TOLERANCE_SECONDS", metering_settings.FUTURE_TOLERANCE_SECONDS)


def _shifted(moment: datetime, delta: timedelta | None) -> datetime | None:
    if delta is None:
        return None
    try:
        return moment + delta
    except OverflowError:
        return None


def validate_timestamp(timestamp: object, *, now: datetime | None = None) -> datetime:
    """The aware UTC time of a fact: from 1970 to 9999, and within ``MAX_BACKDATE`` before and ``MAX_FUTURE`` after
    ``now`` (the server's clock when the event is validated). Raises ``InvalidTimestamp`` (``TimestampOutOfRange``
    for the window)."""
    timestamp = utc_moment(timestamp, "timestamp", InvalidTimestamp)
    now = now or utcnow()
    backdate, future = max_backdate(), max_future()
    # Bounds beyond the absolute range (a huge setting) fall back to it: utc_moment already checked those.
    earliest = None if backdate is None else _shifted(now, -backdate)
    latest = _shifted(now, future)
    if earliest is not None and timestamp < earliest:
        raise TimestampOutOfRange(
            f"timestamp {timestamp.isoformat()} is more than {_span(backdate)} in the past "
            f"(METERING['MAX_BACKDATE']); the earliest accepted now is {earliest.isoformat()}"
        )
    if latest is not None and timestamp > latest:
        raise TimestampOutOfRange(
            f"timestamp {timestamp.isoformat()} is more than {_span(future)} in the future "
            f"(METERING['MAX_FUTURE']); the latest accepted now is {latest.isoformat()}"
        )
    return timestamp


def _span(delta: timedelta | None) -> str:
    return "an unbounded time" if delta is None else str(delta)


# Neither can be stored: PostgreSQL jsonb refuses \u0000 and UTF-8 cannot encode a lone surrogate.
_UNSTORABLE_RE = re.compile("[\x00\ud800-\udfff]")


def validate_metadata(metadata: object) -> dict[str, Any]:
    """A clean copy of ``metadata``: a JSON object with string keys, at most ``MAX_METADATA_DEPTH`` levels deep and
    ``MAX_METADATA_BYTES`` once encoded, holding no NUL and no lone surrogate. Raises ``InvalidMetadata``."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidMetadata(f"metadata must be a JSON object with string keys, got {type(metadata).__name__}")
    limit = metering_settings.MAX_METADATA_BYTES
    budget = limit  # every key and every value takes at least one byte once encoded: a cheap early size bound
    # Iterative, so depth is refused by name instead of by RecursionError (a dict holding itself included).
    pending: list[tuple[dict[Any, Any] | list[Any] | tuple[Any, ...], int]] = [(metadata, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > MAX_METADATA_DEPTH:
            raise InvalidMetadata(f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
        is_object = isinstance(node, dict)
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            budget -= 2 if is_object else 1
            if budget < 0:
                raise InvalidMetadata(f"metadata is larger than {limit} bytes once encoded")
            if is_object:
                if not isinstance(key, str):
                    raise InvalidMetadata(f"metadata keys must be strings, got {type(key).__name__} {_shown(key)}")
                budget = _check_text(key, "key", budget, limit)
            if isinstance(value, str):
                budget = _check_text(value, "value", budget, limit)
            elif isinstance(value, dict | list | tuple):
                pending.append((value, depth + 1))
            elif isinstance(value, float):
                if not math.isfinite(value):
                    raise InvalidMetadata(f"metadata numbers must be finite, got {value!r}")
            elif value is not None and not isinstance(value, int):
                raise InvalidMetadata(f"metadata must hold only JSON values, got {type(value).__name__}")
    try:
        encoded = json.dumps(metadata, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:  # e.g. an int beyond the int -> str digit limit
        raise InvalidMetadata(f"metadata must hold only JSON values: {error}") from None
    if len(encoded.encode()) > limit:
        raise InvalidMetadata(f"metadata is larger than {limit} bytes once encoded")
    loaded: dict[str, Any] = json.loads(encoded)
    return loaded


def _check_text(text: str, role: str, budget: int, limit: int) -> int:
    """Refuse a metadata key or value that cannot be stored; returns the size budget left after it."""
    budget -= len(text)
    if budget < 0:
        raise InvalidMetadata(f"metadata is larger than {limit} bytes once encoded")
    unstorable = _UNSTORABLE_RE.search(text)
    if unstorable is not None:
        what = "NUL (\\u0000)" if unstorable.group() == "\x00" else "a lone surrogate"
        raise InvalidMetadata(f"metadata {role} {_shown(text)} holds {what}, which cannot be stored")
    return budget


def validate_transaction_id(transaction_id: object) -> str:
    """``transaction_id``, or a fresh random one for ``None``: 1-128 printable ASCII characters without spaces.
    Raises ``InvalidTransactionId``."""
    if transaction_id is None:
        return uuid.uuid4().hex
    if not isinstance(transaction_id, str) or not TRANSACTION_ID_RE.fullmatch(transaction_id):
        raise InvalidTransactionId(
            f"transaction_id must be 1-128 printable ASCII characters without spaces, got {_shown(transaction_id)}"
        )
    return str(transaction_id)


def validate_event(event: UsageEvent) -> ValidEvent:
    """Check every field of ``event``. Raises the ``InvalidUsageEvent`` subclass naming the first bad field."""
    if not isinstance(event, UsageEvent):
        raise InvalidUsageEvent(f"expected a UsageEvent, got {type(event).__name__}")
    from tenants.lineage import validate_tenant_id

    return ValidEvent(
        tenant_id=validate_tenant_id(event.tenant_id),
        feature_name=validate_recorded_feature(event.feature_name),
        units=quantity_to_units(event.quantity),
        timestamp=validate_timestamp(event.timestamp),
        metadata=validate_metadata(event.metadata),
        transaction_id=validate_transaction_id(event.transaction_id),
    )
