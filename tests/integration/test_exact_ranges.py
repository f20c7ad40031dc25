"""The exact range, at its edges: the largest documented totals are stored, summed and compared exactly, and the
next unit is refused by name, for that fact only (README, "Exact ranges")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib.resources import files

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metering import UsageEvent, get_meter, rollups
from metering.events import max_quantity_units, units_to_quantity
from metering.exceptions import UsageTotalOutOfRange
from metering.models import UsageRecord, UsageRollup
from metering.rollups import SQLITE_MAX_UNITS
from metering.usage import _units_from_database, get_usage_units
from metering.windows import floor_hour
from quotas.exceptions import QuotaExceeded
from quotas.handler import QuotaPolicyHandler
from quotas.models import MAX_LIMIT_UNITS, QuotaLimit, stored_exactly
from tenants.lineage import get_context
from tenants.models import Tenant
from tests.factories import record, tree
from tests.modes import ROLLUP_RANGE
from tests.quota_helpers import limit

pytestmark = pytest.mark.django_db

HOUR = floor_hour(datetime.now(UTC)) - timedelta(hours=2)


def largest_row_units() -> int:
    return 10**38 - 1 if connection.vendor == "postgresql" else SQLITE_MAX_UNITS


def fill_hour(tenant_ids: list[str], units: int, hour: datetime = HOUR, feature: str = "llm_tokens") -> None:
    """Rollup rows as a long history of facts would have left them (too many facts to write in a test)."""
    for tenant_id in tenant_ids:
        UsageRollup.objects.update_or_create(
            tenant=Tenant.objects.get(external_id=tenant_id),
            feature=feature,
            bucket=hour,
            defaults={"units": units, "events": 1},
        )


def fill_hour_but(tenant_ids: list[str], room: int, hour: datetime = HOUR, feature: str = "llm_tokens") -> None:
    """Every slot of the hour full but ``room`` units in the one writers use (``ROLLUP_SLOTS`` 1: slot 1 on
    PostgreSQL, slot 0 on SQLite): the hour's sum is the largest one minus ``room``."""
    for tenant_id in tenant_ids:
        tenant = Tenant.objects.get(external_id=tenant_id)
        if connection.vendor != "postgresql":
            UsageRollup.objects.create(tenant=tenant, feature=feature, bucket=hour, units=SQLITE_MAX_UNITS - room)
            continue
        UsageRollup.objects.bulk_create(
            UsageRollup(
                tenant=tenant,
                feature=feature,
                bucket=hour,
                slot=slot,
                units=rollups.BASE_UNITS if slot == 0 else rollups.SLOT_UNITS - (room if slot == 1 else 0),
                events=1,
            )
            for slot in range(rollups.SLOT_ROWS)
        )


@pytest.mark.commit_mode(ROLLUP_RANGE)
def test_an_hourly_total_reaches_the_largest_row_exactly_and_the_next_unit_is_refused_by_name():
    with override_settings(METERING={**getattr(django_settings, "METERING", {}), "ROLLUP_SLOTS": 1}):
        check_the_largest_hourly_total()


def check_the_largest_hourly_total():
    tree({"org": None, "project": "org", "other": None})
    largest = largest_row_units()
    maximum = max_quantity_units()
    fill_hour_but(["org", "project"], maximum)
    record("project", units_to_quantity(maximum), timestamp=HOUR + timedelta(minutes=1))  # the largest fact
    org = get_context("org")
    assert _units_from_database(org, "llm_tokens", HOUR, HOUR + timedelta(hours=1)) == largest  # exact, no rounding
    facts = UsageRecord.objects.count()
    with pytest.raises(UsageTotalOutOfRange) as refused:
        record("project", "0.000001", timestamp=HOUR + timedelta(minutes=2))
    assert refused.value.field == "quantity" and refused.value.code == "usage_total_out_of_range"
    assert UsageRecord.objects.count() == facts  # nothing half-written
    project = get_context("project")
    assert _units_from_database(project, "llm_tokens", HOUR, HOUR + timedelta(hours=1)) == largest
    # Only that hour of that tree is full: the next hour, and every other tree, record as usual.
    record("project", 1, timestamp=HOUR + timedelta(hours=1, minutes=1))
    record("other", units_to_quantity(maximum), timestamp=HOUR + timedelta(minutes=3))


def test_window_sums_past_64_bits_are_exact_on_every_backend():
    tree({"org": None, "project": "org"})
    row = SQLITE_MAX_UNITS  # the largest row SQLite holds; three of them pass 2**64
    for offset in range(3):
        fill_hour(["org", "project"], row, HOUR - timedelta(hours=offset))
    context = get_context("org")
    start, end = HOUR - timedelta(hours=2), HOUR + timedelta(hours=1)
    assert _units_from_database(context, "llm_tokens", start, end) == 3 * row
    assert get_usage_units(context, "llm_tokens", None, None) == 3 * row
    assert get_meter().get_usage_sync("org", "llm_tokens", start, end) == units_to_quantity(3 * row)


@pytest.mark.parametrize("used", [10**15 - 2, 2**53 + 12345, 2**62 + 12345, 10**23 + 7])
def test_redis_decisions_are_exact_beyond_double_precision(redis_cache, used):
    """Usage and limit far above 2**53 units: one millionth of room is told apart from none, in the Lua script."""
    if not stored_exactly(used + 1) or used > largest_row_units():
        pytest.skip("SQLite stores limits of at most 15 significant digits exactly (PostgreSQL: 24)")
    tree({"org": None, "project": "org"})
    fill_hour(["org", "project"], used, floor_hour(datetime.now(UTC)))
    limit("org", str(units_to_quantity(used + 1)), period="day")
    handler = QuotaPolicyHandler("project")
    assert handler.check("llm_tokens", "0.000001").allowed
    assert not handler.check("llm_tokens", "0.000002").allowed
    handler.consume("llm_tokens", "0.000001")  # exactly to the limit
    with pytest.raises(QuotaExceeded) as refused:
        handler.consume("llm_tokens", "0.000001")
    assert refused.value.used == units_to_quantity(used + 1) and refused.value.limit == units_to_quantity(used + 1)
    day_start = floor_hour(datetime.now(UTC)).replace(hour=0)
    served = get_usage_units(get_context("org"), "llm_tokens", day_start, day_start + timedelta(days=1))
    assert served == used + 1  # from the exact counter


def test_the_largest_quantity_is_recorded_exactly_and_the_next_unit_is_refused():
    from metering.exceptions import InvalidQuantity

    tree({"org": None})
    maximum = units_to_quantity(max_quantity_units())
    get_meter().record_usage_sync(UsageEvent("org", "llm_tokens", maximum))
    assert UsageRecord.objects.get().quantity == maximum
    with pytest.raises(InvalidQuantity):
        get_meter().record_usage_sync(UsageEvent("org", "llm_tokens", maximum + Decimal("0.000001")))
    assert UsageRecord.objects.count() == 1


# ---- the Lua arithmetic itself, against the real Redis ----

big = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([0, 1, -1, 9_999_999, 10_000_000, 2**53, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), 10**38 - 1]),
)


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(a=big, b=big)
def test_lua_addition_and_comparison_are_exact_at_any_size(redis_cache, a, b):
    source = files("metering").joinpath("lua/bignum.lua").read_text()
    add = redis_cache.register_script(source + "\nreturn big_add(ARGV[1], ARGV[2])")
    compare = redis_cache.register_script(source + "\nreturn big_compare(ARGV[1], ARGV[2])")
    assert int(add(args=[str(a), str(b)])) == a + b
    assert int(compare(args=[str(a), str(b)])) == (a > b) - (a < b)


def test_the_largest_limit_is_stored_exactly_and_the_next_unit_is_refused_by_name():
    from django.core.exceptions import ValidationError

    tenant = tree({"org": None})["org"]
    # PostgreSQL: the column's bound; SQLite: the largest of 15 significant digits below it.
    largest_units = MAX_LIMIT_UNITS if stored_exactly(MAX_LIMIT_UNITS) else 999_999_999_999_999 * 10**9
    largest = units_to_quantity(largest_units)
    quota = QuotaLimit(tenant=tenant, feature="llm_tokens", limit=largest, period="month")
    quota.full_clean()
    quota.save()
    quota.refresh_from_db()
    assert quota.limit_units == largest_units
    beyond = QuotaLimit(tenant=tenant, feature="api_calls", limit=largest + Decimal("0.000001"), period="month")
    with pytest.raises(ValidationError) as refused:
        beyond.full_clean()
    assert "limit" in refused.value.message_dict


def test_a_move_that_would_carry_a_row_past_the_exact_range_is_refused_whole():
    from tenants.tree import move_tenant

    if connection.vendor == "postgresql":
        pytest.skip("PostgreSQL rows hold 10**38 units: no move of real facts reaches that")
    tree({"a": None, "pa": "a", "b": None})
    near = units_to_quantity(max_quantity_units())
    for minute in range(5):
        record("pa", near, timestamp=HOUR + timedelta(minutes=minute))
        record("b", near, timestamp=HOUR + timedelta(minutes=minute))
    rows = list(UsageRollup.objects.order_by("pk").values_list("tenant_id", "units"))
    with pytest.raises(UsageTotalOutOfRange):
        move_tenant("pa", "b")  # b's hour would hold 10 * 10**18 units > 2**63 - 1
    assert list(UsageRollup.objects.order_by("pk").values_list("tenant_id", "units")) == rows
    assert Tenant.objects.get(external_id="pa").parent.external_id == "a"


def test_quantities_read_back_exactly_past_the_decimal_contexts_28_digits():
    tree({"org": None})
    units = 10**28 + 1 if connection.vendor == "postgresql" else SQLITE_MAX_UNITS
    fill_hour(["org"], units)
    assert get_meter().get_usage_sync("org", "llm_tokens", None, None) == units_to_quantity(units)
    assert str(units_to_quantity(units)) == f"{units // 10**6}.{units % 10**6:06d}".rstrip("0").rstrip(".")
