"""Hypothesis over every public Python entry point: any input ends in success or a named error, and a refused call
stores nothing. Bounded (``max_examples``) and, under CI, derandomized (a fixed seed)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import ValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metering import UsageEvent, get_meter
from metering.events import JSON_NUMBER_RE, JsonNumber, quantity_to_units, validate_event
from metering.exceptions import DuplicateUsageEvent, InvalidUsageEvent
from metering.models import UsageRecord, UsageRollup
from quotas.exceptions import InvalidReservationTtl, QuotaExceeded
from quotas.handler import QuotaPolicyHandler
from quotas.models import QuotaReservation
from tenants.exceptions import TenantError
from tenants.lineage import validate_tenant_id
from tenants.models import Tenant
from tests import services
from tests.factories import nested, tree
from tests.quota_helpers import limit

pytestmark = pytest.mark.django_db

NAMED = (InvalidUsageEvent, TenantError, QuotaExceeded, DuplicateUsageEvent, InvalidReservationTtl)
FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=services.in_ci(),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- strategies: plausible values, and the same values broken in the ways hostile callers break them ----

NASTY = [
    "\x00",
    "\ud800",
    "\udfff",
    "\n",
    "\r",
    "\t",
    " ",
    "\u200b",
    "\u202e",
    "³",
    "\u0661",
    "\uff15",
    "_",
    "e",
    "-",
    ".",
]
any_char = st.characters(exclude_categories=())  # surrogates and controls included
nasty_text = st.one_of(
    st.text(any_char, max_size=20),
    st.sampled_from(NASTY),
    st.text(st.sampled_from(NASTY), min_size=1, max_size=5),
    st.text(any_char, min_size=120, max_size=140),
)


def broken(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid string with nasty text inserted somewhere (or appended: the trailing newline)."""
    return st.builds(
        lambda text, cut, nasty: text[: cut % (len(text) + 1)] + nasty + text[cut % (len(text) + 1) :],
        valid,
        st.integers(0, 200),
        st.sampled_from(NASTY) | nasty_text,
    )


non_str = st.one_of(st.none(), st.integers(), st.booleans(), st.binary(max_size=5), st.just(["k1"]), st.floats())
decimal_strings = st.from_regex(r"\A[0-9]{1,14}(\.[0-9]{1,7})?\Z")
json_literals = st.one_of(
    st.from_regex(JSON_NUMBER_RE, fullmatch=True),
    st.builds(lambda m, e: f"{m}e{e}", st.sampled_from(["1", "5", "0", "-1", "1.5"]), st.integers(-(10**7), 10**7)),
    st.sampled_from(["1e-9999999", "1e400", "5e2", "0e-99999", " 1.5", "1_0.0", "nan", "-0.0"]),
)


def json_number(literal: str) -> Any:
    try:
        return JsonNumber(literal)
    except ValueError:  # not even a float literal: the REST parser never makes one
        return literal


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), nasty_text)
offsets = st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59))
moments = st.one_of(
    st.datetimes(timezones=st.builds(timezone, offsets)),  # years 1-9999 at any offset
    st.datetimes(),  # naive
    st.dates(),
    st.just(datetime.now(UTC) + timedelta(days=1)),
    st.sampled_from([datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))), "2026-01-01T00:00:00Z", 0]),
)
# Per field: (plausible values, hostile values).
FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "tenant_id": (st.sampled_from(["org", "k1", "k2"]), st.one_of(broken(st.just("k1")), nasty_text, non_str)),
    "feature_name": (
        st.sampled_from(["llm_tokens", "api_calls"]),
        st.one_of(broken(st.just("llm_tokens")), nasty_text, non_str),
    ),
    "quantity": (
        st.one_of(st.integers(0, 1000), st.decimals(min_value=0, max_value=1000, places=6), decimal_strings),
        st.one_of(
            st.integers(),
            st.just(10**4000),
            st.floats(),
            st.decimals(),
            json_literals.map(json_number),
            broken(decimal_strings),
            nasty_text,
            non_str,
        ),
    ),
    "timestamp": (
        st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2026, 1, 1), timezones=st.just(UTC)),
        moments,
    ),
    "metadata": (
        st.dictionaries(st.text(max_size=5), st.one_of(st.integers(0, 100), st.text(max_size=10)), max_size=3),
        st.one_of(
            st.recursive(
                json_leaf,
                lambda children: (
                    st.lists(children, max_size=3)
                    | st.dictionaries(nasty_text | st.integers(), children, min_size=1, max_size=3)
                ),
                max_leaves=20,
            ).map(lambda value: value if isinstance(value, dict) else {"k": value}),
            st.integers(1, 12_000).map(nested),
            st.sampled_from([{"k": float("nan")}, {"k": 10**5000}, {"k": Decimal(1)}, ["a"], "text"]),
        ),
    ),
    "transaction_id": (
        st.one_of(st.none(), st.sampled_from(["tx-1", "tx-2", "x" * 128])),
        st.one_of(broken(st.just("tx-1")), st.just("x" * 128 + "\n"), nasty_text, non_str),
    ),
    "start_time": (st.none() | st.just(datetime(2026, 1, 1, tzinfo=UTC)), moments),
    "end_time": (st.none() | st.just(datetime(2026, 2, 1, tzinfo=UTC)), moments),
    "ttl": (
        st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(hours=1)),
        st.one_of(st.timedeltas(), st.integers(), st.floats(), st.none(), st.just(timedelta(days=1, microseconds=1))),
    ),
}
EVENT_FIELDS = ("tenant_id", "feature_name", "quantity", "timestamp", "metadata", "transaction_id")


@st.composite
def arguments(draw: st.DrawFn, *fields: str) -> dict[str, Any]:
    """Plausible values for ``fields``, most often with one of them (sometimes more) made hostile: a call whose
    every other argument is valid reaches the code that stores, where an unnamed error would surface."""
    hostile = draw(st.sets(st.sampled_from(fields), max_size=2) | st.sampled_from(fields).map(lambda f: {f}))
    return {field: draw(FIELDS[field][1] if field in hostile else FIELDS[field][0]) for field in fields}


# ---- the property ----


@pytest.fixture
def forest() -> None:
    tree({"org": None, "k1": "org", "k2": "org"})
    limit("org", 10**9)


def stored() -> tuple[int, int, int]:
    return UsageRecord.objects.count(), UsageRollup.objects.count(), QuotaReservation.objects.count()


def outcome(call: Any) -> BaseException | None:
    """Run ``call``: ``None`` on success, the named error otherwise; any other exception fails the test. A refused
    call must leave every table as it found it."""
    before = stored()
    try:
        call()
        assert stored() >= before  # and the transaction is still usable
        return None
    except NAMED as error:
        assert isinstance(error, ValueError | QuotaExceeded | DuplicateUsageEvent)
        if isinstance(error, ValueError):
            assert isinstance(getattr(error, "field", None), str) and getattr(error, "code", None)
        assert stored() == before, f"{type(error).__name__} stored something"
        return error


@FUZZ
@given(arguments(*EVENT_FIELDS))
def test_events_through_every_recording_entry_point(forest, args):
    event = UsageEvent(**args)
    pure = outcome(lambda: validate_event(event))
    meter = get_meter()
    recorded = outcome(lambda: meter.record_usage_sync(event))
    if pure is not None:  # what validation refuses, recording refuses the same way
        assert type(recorded) is type(pure) and getattr(recorded, "field", None) == getattr(pure, "field", None)
    outcome(lambda: async_to_sync(meter.record_usage)(event))


@FUZZ
@given(arguments("tenant_id", "feature_name", "quantity", "metadata", "transaction_id", "ttl"))
def test_every_quota_entry_point(forest, args):
    handler = QuotaPolicyHandler(args["tenant_id"])
    feature, quantity, meta, transaction = (
        args["feature_name"],
        args["quantity"],
        args["metadata"],
        args["transaction_id"],
    )
    outcome(lambda: handler.consume(feature, quantity, metadata=meta, transaction_id=transaction))
    outcome(lambda: async_to_sync(handler.aconsume)(feature, quantity, metadata=meta, transaction_id=transaction))
    outcome(lambda: handler.check(feature, quantity))
    held: list[Any] = []
    outcome(lambda: held.append(handler.reserve(feature, quantity, ttl=args["ttl"])))
    if held:
        reservation = held[0]
        outcome(lambda: reservation.commit(quantity, metadata=meta, transaction_id=transaction))
        reservation.release()


@FUZZ
@given(arguments("tenant_id", "feature_name", "start_time", "end_time"))
def test_usage_queries(forest, args):
    meter = get_meter()
    query = (args["tenant_id"], args["feature_name"], args["start_time"], args["end_time"])
    sync = outcome(lambda: meter.get_usage_sync(*query))
    asynchronous = outcome(lambda: async_to_sync(meter.get_usage)(*query))
    assert type(sync) is type(asynchronous)


@FUZZ
@given(FIELDS["quantity"][0] | FIELDS["quantity"][1])
def test_quantity_to_units_is_exact_or_named(quantity):
    try:
        units = quantity_to_units(quantity)
    except InvalidUsageEvent as error:
        assert error.field == "quantity"
        return
    assert isinstance(units, int) and 0 <= units <= 10**18
    if isinstance(quantity, str):  # the string grammar: the value written, exactly
        assert Decimal(quantity) * 10**6 == units
    elif isinstance(quantity, JsonNumber):
        written = Decimal(quantity.literal)
        # Decimal's default context is exact at this size; a zero may carry any exponent (0E+10**18 is 0).
        assert (0 if written.is_zero() else written * 10**6) == units


@settings(max_examples=300, deadline=None, derandomize=services.in_ci())
@given(st.one_of(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,130}\Z"), broken(st.just("k1")), nasty_text))
def test_a_tenant_id_is_addressable_exactly_when_it_can_be_created(text):
    try:
        validate_tenant_id(text)
        addressable = True
    except TenantError:
        addressable = False
    try:
        Tenant(external_id=text).full_clean(exclude=["parent"], validate_unique=False, validate_constraints=False)
        creatable = True
    except ValidationError as error:
        assert "external_id" in error.message_dict
        creatable = False
    assert addressable == creatable, repr(text)


def test_a_date_is_not_a_datetime():
    with pytest.raises(InvalidUsageEvent) as raised:
        validate_event(UsageEvent("k1", "llm_tokens", 1, date(2026, 1, 1)))  # type: ignore[arg-type]
    assert raised.value.field == "timestamp"
