"""Hostile input to the Python API: each value gets its named ``ValueError`` subclass (``.field``, ``.code``) from
every entry point that takes it, and nothing is stored."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import ValidationError
from django.test import override_settings

from metering import UsageEvent, get_meter
from metering.checks import check_metering_settings
from metering.events import (
    EARLIEST_TIMESTAMP,
    MAX_METADATA_DEPTH,
    JsonNumber,
    quantity_to_units,
    validate_event,
    validate_metadata,
)
from metering.exceptions import (
    InvalidFeatureName,
    InvalidMetadata,
    InvalidPeriod,
    InvalidQuantity,
    InvalidTimestamp,
    InvalidTransactionId,
    InvalidUsageEvent,
)
from metering.models import UsageRecord, UsageRollup
from quotas.exceptions import MAX_RESERVATION_TTL, InvalidReservationTtl
from quotas.handler import QuotaPolicyHandler
from quotas.models import QuotaReservation
from tenants.exceptions import InvalidTenantId, UnknownTenant
from tenants.models import Tenant
from tenants.tree import create_tenant
from tests.factories import any_backdate, nested, tree
from tests.quota_helpers import limit

pytestmark = pytest.mark.django_db

PLUS_5 = timezone(timedelta(hours=5))
MINUS_5 = timezone(timedelta(hours=-5))
NOW = datetime.now(UTC)


def nested_lists(depth: int) -> list[Any]:
    root: list[Any] = []
    for _ in range(depth - 1):
        root = [root]
    return root


def self_holding() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


# (field, value, error). Every value is refused by every entry point that takes the field.
BAD_TENANT_IDS = [
    "k1\x00",
    "\x00",
    "k\ud800",
    "\udfff",
    "k1\n",
    "k1\r",
    " k1",
    "k1 ",
    "k 1",
    "k1\t",
    "k\x07",  # Cc
    "k\u200b1",  # Cf: zero-width space
    "k\u202e1",  # Cf: right-to-left override
    "\uff4b\uff11",  # fullwidth k1
    "k\u0661",  # Arabic-Indic digit one
    "",
    "x" * 129,
    "-k1",  # the model's grammar: starts with a letter or digit
    5,
    None,
    b"k1",
    ["k1"],
]
BAD_FEATURES = [
    "llm_tokens\n",
    "llm_tokens\x00",
    "llm\ud800",
    "",
    " llm_tokens",
    "has space",
    "x" * 101,
    ".leading",
    "tokens³",
    "٣",
    5,
    None,
]
BAD_QUANTITIES = [
    " 7 ",
    "7 ",
    "7\n",
    "1_000",
    "١٢",
    "³",
    "\uff15",  # fullwidth 5
    "5e2",
    "1E3",
    "-1",
    "+1",
    "-0",
    "1.",
    ".5",
    "",
    "NaN",
    "Infinity",
    "0x10",
    "0.0000001",
    "1000000000000.000001",
    "1000000000001",
    JsonNumber("1e-9999999"),  # not 0: Decimal would underflow it to 0
    JsonNumber("1e-7"),
    JsonNumber("1e400"),
    JsonNumber("1e13"),
    JsonNumber("-1.5"),
    JsonNumber("1_0.5"),
    JsonNumber(" 1.5"),
    JsonNumber("1e" + "9" * 5000),
    JsonNumber("1e-" + "9" * 5000),
    float("nan"),
    float("inf"),
    float("-inf"),
    -0.5,
    1e-7,
    5e-324,
    1e13,
    10**4000,
    10**12 + 1,
    -1,
    True,
    False,
    None,
    [1],
    b"1",
    Decimal("NaN"),
    Decimal("sNaN"),
    Decimal("Infinity"),
    Decimal("-1"),
    Decimal("1e-9999999"),
    Decimal("0.1234567"),
    Decimal("1e13"),
    Decimal("1e999999999"),
]
TOMORROW = NOW + timedelta(days=1)
BAD_TIMESTAMPS = [
    datetime(1, 1, 1, tzinfo=PLUS_5),  # year 0 in UTC
    datetime(9999, 12, 31, 23, tzinfo=MINUS_5),  # year 10000 in UTC
    datetime.min.replace(tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before the Unix epoch
    datetime(1970, 1, 1, 4, 59, tzinfo=PLUS_5),  # 1969 in UTC
    TOMORROW,
    datetime(2026, 1, 1),  # naive
    date(2026, 1, 1),
    "2026-01-01T00:00:00Z",
    1767225600,
    None,
]
BAD_METADATA = [
    {"k\x00": 1},
    {"k": "v\x00"},
    {"\ud800": 1},
    {"k": "\udfff"},
    {"k": ["ok", {"deep": "\x00"}]},
    {"k": {"\x00": "in a nested key"}},
    nested(10_000),  # never RecursionError
    nested(MAX_METADATA_DEPTH + 1),
    {"k": nested_lists(MAX_METADATA_DEPTH)},  # lists count as levels too
    self_holding(),
    {1: "int key"},
    {"k": {2: "nested int key"}},
    {("a", "b"): 1},
    {"k": float("nan")},
    {"k": [float("inf")]},
    {"k": 10**5000},  # beyond the int -> str digit limit
    {"k": b"bytes"},
    {"k": {1, 2}},
    {"k": Decimal(1)},
    {"k": NOW},
    {"k": "x" * 5000},
    {f"k{i}": i for i in range(3000)},
    ["not", "an", "object"],
    "not an object",
    5,
]
BAD_TRANSACTION_IDS = [
    "x" * 128 + "\n",
    "tx\n",
    "tx\x00",
    "tx\ud800",
    "",
    " ",
    "has space",
    "tx\t",
    "é",
    "x" * 129,
    5,
    b"tx",
]
BAD_MOMENTS = [
    datetime(1, 1, 1, tzinfo=PLUS_5),
    datetime(9999, 12, 31, 23, tzinfo=MINUS_5),
    datetime(1969, 12, 31, tzinfo=UTC),
    datetime(9999, 6, 1, tzinfo=UTC),  # no window computation may leave year 9999
    datetime.max.replace(tzinfo=UTC),
    datetime(2026, 1, 1),
    date(2026, 1, 1),
    "2026-01-01",
    0,
]
BAD_TTLS = [
    timedelta(0),
    timedelta(seconds=-1),
    timedelta.min,
    MAX_RESERVATION_TTL + timedelta(microseconds=1),
    timedelta.max,
    600,
    1.5,
    "10m",
    None,
    NOW,
]

ERRORS = {
    "tenant_id": InvalidTenantId,
    "feature_name": InvalidFeatureName,
    "quantity": InvalidQuantity,
    "timestamp": InvalidTimestamp,
    "metadata": InvalidMetadata,
    "transaction_id": InvalidTransactionId,
    "start_time": InvalidPeriod,
    "end_time": InvalidPeriod,
    "ttl": InvalidReservationTtl,
}
CODES = {
    "tenant_id": "invalid_tenant_id",
    "feature_name": "invalid_feature_name",
    "quantity": "invalid_quantity",
    "timestamp": "invalid_timestamp",
    "metadata": "invalid_metadata",
    "transaction_id": "invalid_transaction_id",
    "start_time": "invalid_period",
    "end_time": "invalid_period",
    "ttl": "invalid_ttl",
}
BAD_VALUES = {
    "tenant_id": BAD_TENANT_IDS,
    "feature_name": BAD_FEATURES,
    "quantity": BAD_QUANTITIES,
    "timestamp": BAD_TIMESTAMPS,
    "metadata": BAD_METADATA,
    "transaction_id": BAD_TRANSACTION_IDS,
    "start_time": BAD_MOMENTS,
    "end_time": BAD_MOMENTS,
    "ttl": BAD_TTLS,
}
EVENT_FIELDS = ("tenant_id", "feature_name", "quantity", "timestamp", "metadata", "transaction_id")
VALID: dict[str, Any] = {
    "tenant_id": "k1",
    "feature_name": "llm_tokens",
    "quantity": 1,
    "timestamp": NOW,
    "metadata": {"model": "m"},
    "transaction_id": None,
    "start_time": None,
    "end_time": None,
    "ttl": timedelta(minutes=5),
}


def _event(args: dict[str, Any]) -> UsageEvent:
    return UsageEvent(**{name: args[name] for name in EVENT_FIELDS})


def _commit(args: dict[str, Any]) -> None:
    args["reservation"].commit(args["quantity"], metadata=args["metadata"], transaction_id=args["transaction_id"])


ENTRY_POINTS: dict[str, tuple[tuple[str, ...], Any]] = {
    "validate_event": (EVENT_FIELDS, lambda a: validate_event(_event(a))),
    "record_usage_sync": (EVENT_FIELDS, lambda a: get_meter().record_usage_sync(_event(a))),
    "record_usage": (EVENT_FIELDS, lambda a: async_to_sync(get_meter().record_usage)(_event(a))),
    "get_usage_sync": (
        ("tenant_id", "feature_name", "start_time", "end_time"),
        lambda a: get_meter().get_usage_sync(a["tenant_id"], a["feature_name"], a["start_time"], a["end_time"]),
    ),
    "get_usage": (
        ("tenant_id", "feature_name", "start_time", "end_time"),
        lambda a: async_to_sync(get_meter().get_usage)(
            a["tenant_id"], a["feature_name"], a["start_time"], a["end_time"]
        ),
    ),
    "handler.consume": (
        ("tenant_id", "feature_name", "quantity", "metadata", "transaction_id"),
        lambda a: QuotaPolicyHandler(a["tenant_id"]).consume(
            a["feature_name"], a["quantity"], metadata=a["metadata"], transaction_id=a["transaction_id"]
        ),
    ),
    "handler.check": (
        ("tenant_id", "feature_name", "quantity"),
        lambda a: QuotaPolicyHandler(a["tenant_id"]).check(a["feature_name"], a["quantity"]),
    ),
    "handler.reserve": (
        ("tenant_id", "feature_name", "quantity", "ttl"),
        lambda a: QuotaPolicyHandler(a["tenant_id"]).reserve(a["feature_name"], a["quantity"], ttl=a["ttl"]),
    ),
    "handler.areserve": (
        ("ttl",),
        lambda a: async_to_sync(QuotaPolicyHandler(a["tenant_id"]).areserve)(
            a["feature_name"], a["quantity"], ttl=a["ttl"]
        ),
    ),
    "reservation.commit": (("quantity", "metadata", "transaction_id"), _commit),
}

# consume(metadata=...) and commit(metadata=...) take ``metadata or {}``: a falsy non-dict is never seen (a
# handler.py matter, reported); every BAD_METADATA value here is truthy so the table holds for them too.
assert all(value for value in BAD_METADATA)

CASES = [
    pytest.param(entry, field, value, id=f"{entry}-{field}-{index}")
    for entry, (fields, _) in ENTRY_POINTS.items()
    for field in fields
    for index, value in enumerate(BAD_VALUES[field])
]


@pytest.fixture
def forest() -> None:
    tree({"org": None, "k1": "org"})
    limit("org", 1000)


def stored() -> tuple[int, int, int]:
    return UsageRecord.objects.count(), UsageRollup.objects.count(), QuotaReservation.objects.count()


@pytest.mark.parametrize(("entry", "field", "value"), CASES)
def test_hostile_value_raises_its_named_error_and_stores_nothing(forest, entry, field, value):
    _, call = ENTRY_POINTS[entry]
    reservation = QuotaPolicyHandler("k1").reserve("llm_tokens", 1) if entry == "reservation.commit" else None
    before = stored()
    with pytest.raises(ERRORS[field]) as raised:
        call({**VALID, field: value, "reservation": reservation})
    assert isinstance(raised.value, ValueError)
    error: Any = raised.value
    assert error.field == field
    # A moment the server's window refuses (MAX_FUTURE) has its own code; the malformed ones keep theirs.
    assert error.code == ("timestamp_out_of_range" if value is TOMORROW else CODES[field])
    assert stored() == before
    if reservation is not None:
        assert not reservation.closed  # still held: the caller may commit a valid amount or release it
        assert QuotaReservation.objects.get().state == "active"


def test_hostile_values_through_the_redis_counters_store_nothing(forest, redis_cache):
    # The table's record and consume paths once more with Redis counters on: refused before any counter moves.
    handler = QuotaPolicyHandler("k1")
    handler.consume("llm_tokens", 1)  # the counters exist from here on
    for entry in ("record_usage_sync", "handler.consume"):
        fields, call = ENTRY_POINTS[entry]
        for field in fields:
            for value in BAD_VALUES[field]:
                before = stored()
                with pytest.raises(ERRORS[field]):
                    call({**VALID, field: value})
                assert stored() == before, (entry, field, value)
    handler.consume("llm_tokens", 2)
    assert handler.check("llm_tokens", 997).allowed and not handler.check("llm_tokens", 998).allowed
    assert get_meter().get_usage_sync("org", "llm_tokens", None, None) == 3


def test_an_unknown_tenant_is_named_by_every_entry_point(forest):
    for entry in ("record_usage_sync", "record_usage", "get_usage_sync", "handler.consume", "handler.reserve"):
        with pytest.raises(UnknownTenant) as raised:
            ENTRY_POINTS[entry][1]({**VALID, "tenant_id": "ghost"})
        assert (raised.value.field, raised.value.code) == ("tenant_id", "unknown_tenant")
    assert stored() == (0, 0, 0)


def test_end_before_start_names_end_time(forest):
    with pytest.raises(InvalidPeriod) as raised:
        get_meter().get_usage_sync("k1", "llm_tokens", NOW, NOW - timedelta(microseconds=1))
    assert raised.value.field == "end_time"


def test_a_non_event_is_a_named_error():
    with pytest.raises(InvalidUsageEvent) as raised:
        validate_event({"tenant_id": "k1"})  # type: ignore[arg-type]
    assert isinstance(raised.value, ValueError) and raised.value.field == "event"


@pytest.mark.parametrize("falsy", [[], "", 0, False])
def test_consume_and_commit_refuse_falsy_non_dict_metadata(forest, falsy):
    handler = QuotaPolicyHandler("k1")
    with pytest.raises(InvalidMetadata):
        handler.consume("llm_tokens", 1, metadata=falsy)
    with handler.reserve("llm_tokens", 1) as reservation, pytest.raises(InvalidMetadata):
        reservation.commit(1, metadata=falsy)
    assert UsageRecord.objects.count() == 0


# ---- the boundaries: the largest (or smallest) valid value is accepted exactly ----


@pytest.mark.parametrize(
    ("quantity", "units"),
    [
        ("1000000000000", 10**18),
        ("999999999999.999999", 10**18 - 1),
        ("0", 0),
        ("0.000001", 1),
        ("0" * 10_000 + "1.5", 1_500_000),
        (10**12, 10**18),
        (0.1, 100_000),
        (1e-6, 1),
        (-0.0, 0),
        (Decimal("1E+2"), 100_000_000),
        (Decimal("-0"), 0),
        (Decimal("1.500000000"), 1_500_000),
        (JsonNumber("5e2"), 500_000_000),
        (JsonNumber("1E-6"), 1),
        (JsonNumber("0e-99999999999"), 0),
        (JsonNumber("1.0e+12"), 10**18),
        (JsonNumber("100e-8"), 1),
    ],
)
def test_valid_quantities_are_exact(quantity, units):
    assert quantity_to_units(quantity) == units


@any_backdate()
def test_the_largest_values_are_stored_and_the_next_is_refused(forest):
    record = get_meter().record_usage_sync
    record(UsageEvent("k1", "f" * 100, "1000000000000", EARLIEST_TIMESTAMP, nested(MAX_METADATA_DEPTH), "x" * 128))
    assert UsageRecord.objects.get().timestamp == EARLIEST_TIMESTAMP
    assert get_meter().get_usage_sync("org", "f" * 100, None, None) == Decimal(10**12)
    with pytest.raises(InvalidQuantity, match="maximum of 1000000000000"):
        record(UsageEvent("k1", "llm_tokens", "1000000000000.000001"))
    QuotaPolicyHandler("k1").reserve("llm_tokens", 1, ttl=MAX_RESERVATION_TTL).release()
    assert stored() == (1, 2, 1)


def test_huge_inputs_are_refused_quickly():
    wide = dict.fromkeys(map(str, range(1_000_000)), 0)
    started = time.perf_counter()
    for value in (10**4000, JsonNumber("1e" + "9" * 100_000), "1" * 1_000_000, Decimal("1e-999999999")):
        with pytest.raises(InvalidQuantity):
            quantity_to_units(value)
    with pytest.raises(InvalidMetadata):
        validate_metadata({"k": "x" * 10_000_000})
    with pytest.raises(InvalidMetadata):
        validate_metadata(wide)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("maximum", "largest_units"),
    [(Decimal("9223372036854.775807"), 2**63 - 1), (10**12, 10**18), ("5.5", 5_500_000)],
)
def test_max_quantity_up_to_int64_units_is_accepted(maximum, largest_units):
    with override_settings(METERING={"MAX_QUANTITY": maximum}):
        assert not [m for m in check_metering_settings() if m.id == "xaas_metering.E006"]
        assert quantity_to_units(Decimal(largest_units).scaleb(-6)) == largest_units
        with pytest.raises(InvalidQuantity):
            quantity_to_units(Decimal(largest_units + 1).scaleb(-6))


@pytest.mark.parametrize("maximum", [Decimal("9223372036854.775808"), 10**13, 0, -1, "lots", Decimal("NaN"), True])
def test_a_max_quantity_beyond_int64_units_fails_the_system_check(maximum):
    with override_settings(METERING={"MAX_QUANTITY": maximum}):
        errors = [m for m in check_metering_settings() if m.id == "xaas_metering.E006"]
    assert len(errors) == 1 and "MAX_QUANTITY" in errors[0].msg


# ---- tenant ids: what can be created can be addressed, and what is refused cannot be created ----


@pytest.mark.parametrize("tenant_id", [value for value in BAD_TENANT_IDS if isinstance(value, str)])
def test_a_refused_tenant_id_cannot_be_created(tenant_id):
    with pytest.raises((ValidationError, ValueError)):
        create_tenant(tenant_id)
    from tenants.models import Tenant

    assert not Tenant.objects.exists()


@pytest.mark.parametrize("tenant_id", ["a", "org-1", "user@example.com", "A.b_c:d@e-f", "9" * 128])
def test_a_created_tenant_is_addressable(tenant_id):
    create_tenant(tenant_id)
    get_meter().record_usage_sync(UsageEvent(tenant_id, "llm_tokens", 2))
    assert QuotaPolicyHandler(tenant_id).check("llm_tokens", 1).allowed
    assert get_meter().get_usage_sync(tenant_id, "llm_tokens", None, None) == 2


@any_backdate()
def test_odd_but_valid_offsets_are_stored_and_queried_in_utc(forest):
    # Python allows any offset below 24 h, to the microsecond; PostgreSQL refuses such displacements, so every
    # moment is converted to UTC before it reaches a query.
    odd = timezone(-timedelta(hours=21, minutes=56, microseconds=976816))
    moment = datetime(2026, 1, 10, 3, 0, tzinfo=odd)
    get_meter().record_usage_sync(UsageEvent("k1", "llm_tokens", 3, moment))
    assert UsageRecord.objects.get().timestamp == moment.astimezone(UTC)
    start = datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=23, minutes=59, seconds=59, microseconds=999999)))
    end = datetime(2026, 2, 1, 0, 0, 0, 1, tzinfo=odd)
    assert get_meter().get_usage_sync("org", "llm_tokens", start, end) == 3
    assert get_meter().get_usage_sync("org", "llm_tokens", None, end) == 3


def test_hostile_values_in_log_mode_append_and_count_nothing(forest, redis_cache):
    # Log mode (metering.appender): every entry point validates before its one script call, so a bad value appends
    # nothing to the tree's stream and moves no counter.
    from metering import appender, log
    from tests.log_helpers import log_mode

    appender.forget_snapshots()
    with log_mode():
        handler = QuotaPolicyHandler("k1")
        handler.consume("llm_tokens", 1)  # the tree's log and counters exist from here on
        stream = log.stream_key(Tenant.objects.get(external_id="org").pk)
        for entry in ("record_usage_sync", "record_usage", "handler.consume", "handler.check", "handler.reserve"):
            fields, call = ENTRY_POINTS[entry]
            for field in fields:
                for value in BAD_VALUES[field]:
                    before = (stored(), redis_cache.xlen(stream))
                    with pytest.raises(ERRORS[field]):
                        call({**VALID, field: value})
                    assert (stored(), redis_cache.xlen(stream)) == before, (entry, field, value)
        reservation = handler.reserve("llm_tokens", 1)
        fields, call = ENTRY_POINTS["reservation.commit"]
        for field in fields:
            for value in BAD_VALUES[field]:
                with pytest.raises(ERRORS[field]):
                    call({**VALID, field: value, "reservation": reservation})
        assert not reservation.closed and QuotaReservation.objects.get().state == "active"
        assert redis_cache.xlen(stream) == 1
        handler.consume("llm_tokens", 2)
        assert handler.check("llm_tokens", 996).allowed and not handler.check("llm_tokens", 997).allowed  # 1 held
        assert get_meter().get_usage_sync("org", "llm_tokens", None, None) == 3
    appender.forget_snapshots()
