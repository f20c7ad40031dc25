from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from metering import (
    DuplicateUsageEvent,
    InactiveTenant,
    InvalidFeatureName,
    InvalidMetadata,
    InvalidPeriod,
    InvalidQuantity,
    InvalidTimestamp,
    InvalidTransactionId,
    InvalidUsageEvent,
    MeteringProtocol,
    UnknownTenant,
    UsageEvent,
    get_meter,
)
from metering.models import UsageRecord, UsageRollup
from metering.signals import usage_recorded
from tenants.exceptions import InvalidTenantId
from tenants.models import Tenant
from tests.factories import any_backdate, record, tree, usage
from tests.modes import QUERY_COUNT

pytestmark = pytest.mark.django_db

ORG = {"org": None, "p1": "org", "p2": "org", "k1": "p1", "k2": "p1", "k3": "p2"}


def test_usage_of_a_tenant_is_the_sum_over_its_subtree():
    tree(ORG)
    record("k1", "1.5")
    record("k2", 2)
    record("p1", "0.25")
    record("k3", 10)
    record("k3", 1, feature="api_calls")
    assert usage("k1") == Decimal("1.5")
    assert usage("p1") == Decimal("3.75")
    assert usage("p2") == Decimal(10)
    assert usage("org") == Decimal("13.75")
    assert usage("org", "api_calls") == Decimal(1)
    assert usage("k2", "api_calls") == Decimal(0)


def test_default_meter_implements_the_protocol(settings):
    assert isinstance(get_meter(), MeteringProtocol)
    settings.METERING = {"ADAPTER": "tests.metering.test_recording.CountingAdapter"}
    assert type(get_meter()).__name__ == "CountingAdapter"


class CountingAdapter:
    async def record_usage(self, event):
        return None

    async def get_usage(self, tenant_id, feature_name, start_time, end_time):
        return Decimal(0)

    def record_usage_sync(self, event):
        return None

    def get_usage_sync(self, tenant_id, feature_name, start_time, end_time):
        return Decimal(0)


def test_same_transaction_id_is_stored_and_counted_once():
    tree(ORG)
    record("k1", 5, transaction_id="req-1")
    with pytest.raises(DuplicateUsageEvent) as duplicate:
        record("k1", 5, transaction_id="req-1")
    assert duplicate.value.record_id == UsageRecord.objects.get().pk
    # The same key for another tenant is another fact.
    record("k2", 5, transaction_id="req-1")
    assert UsageRecord.objects.count() == 2
    assert usage("org") == Decimal(10)


def test_transaction_id_is_generated_when_missing():
    tree(ORG)
    record("k1", 1)
    record("k1", 1)
    ids = list(UsageRecord.objects.values_list("transaction_id", flat=True))
    assert len(set(ids)) == 2 and all(ids)


NOW = datetime.now(UTC)


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        ({"quantity": -1}, InvalidQuantity, "quantity"),
        ({"quantity": float("nan")}, InvalidQuantity, "quantity"),
        ({"quantity": float("inf")}, InvalidQuantity, "quantity"),
        ({"quantity": Decimal("NaN")}, InvalidQuantity, "quantity"),
        ({"quantity": "12abc"}, InvalidQuantity, "quantity"),
        ({"quantity": None}, InvalidQuantity, "quantity"),
        ({"quantity": True}, InvalidQuantity, "quantity"),
        ({"quantity": [1]}, InvalidQuantity, "quantity"),
        ({"quantity": Decimal("1e30")}, InvalidQuantity, "quantity"),
        ({"quantity": "0.0000001"}, InvalidQuantity, "quantity"),
        ({"timestamp": datetime(2026, 1, 1)}, InvalidTimestamp, "timestamp"),  # naive
        ({"timestamp": NOW + timedelta(days=1)}, InvalidTimestamp, "timestamp"),
        ({"timestamp": "2026-01-01T00:00:00Z"}, InvalidTimestamp, "timestamp"),
        ({"feature_name": ""}, InvalidFeatureName, "feature_name"),
        ({"feature_name": "has space"}, InvalidFeatureName, "feature_name"),
        ({"feature_name": "x" * 101}, InvalidFeatureName, "feature_name"),
        ({"metadata": {"blob": "x" * 5000}}, InvalidMetadata, "metadata"),
        ({"metadata": {"when": datetime.now(UTC)}}, InvalidMetadata, "metadata"),
        ({"metadata": {1: "int key"}}, InvalidMetadata, "metadata"),
        ({"metadata": ["not", "a", "dict"]}, InvalidMetadata, "metadata"),
        ({"transaction_id": "has space"}, InvalidTransactionId, "transaction_id"),
        ({"transaction_id": "x" * 129}, InvalidTransactionId, "transaction_id"),
        ({"tenant_id": "ghost"}, UnknownTenant, "tenant_id"),
        ({"tenant_id": ""}, InvalidTenantId, "tenant_id"),
        ({"tenant_id": "k-inactive"}, InactiveTenant, "tenant_id"),
        ({"tenant_id": "k-under-inactive"}, InactiveTenant, "tenant_id"),
    ],
)
def test_bad_input_raises_its_named_error_and_stores_nothing(change, error, field):
    tree({**ORG, "inactive-project": "org", "k-under-inactive": "inactive-project", "k-inactive": "p1"})
    Tenant.objects.filter(external_id__in=["k-inactive", "inactive-project"]).update(is_active=False)
    event = {"tenant_id": "k1", "feature_name": "llm_tokens", "quantity": 1, "timestamp": NOW, **change}
    with pytest.raises(error) as raised:
        get_meter().record_usage_sync(UsageEvent(**event))
    assert isinstance(raised.value, ValueError)
    assert getattr(raised.value, "field", None) == field
    assert getattr(raised.value, "code", None)
    assert UsageRecord.objects.count() == 0
    assert UsageRollup.objects.count() == 0


def test_every_bad_input_error_is_an_invalid_usage_event_or_a_tenant_error():
    from tenants.exceptions import TenantError

    for error in (InvalidQuantity, InvalidTimestamp, InvalidFeatureName, InvalidMetadata, InvalidTransactionId):
        assert issubclass(error, InvalidUsageEvent) and issubclass(error, ValueError)
    assert issubclass(UnknownTenant, TenantError) and issubclass(UnknownTenant, ValueError)


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [(1, "1"), ("2.5", "2.5"), (Decimal("0.000001"), "0.000001"), (0.1, "0.1"), ("1000000000000", "1000000000000")],
)
def test_quantities_are_exact(quantity, expected):
    tree(ORG)
    for _ in range(3):
        record("k1", quantity)
    assert usage("org") == Decimal(expected) * 3


@any_backdate()
def test_timestamps_are_stored_in_utc_and_backdating_counts_in_its_own_window():
    from zoneinfo import ZoneInfo

    tree(ORG)
    paris = datetime(2026, 3, 1, 0, 30, tzinfo=ZoneInfo("Europe/Paris"))  # 2026-02-28 23:30 UTC
    record("k1", 7, timestamp=paris)
    fact = UsageRecord.objects.get()
    assert fact.timestamp == datetime(2026, 2, 28, 23, 30, tzinfo=UTC)
    february = (datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC))
    march = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
    assert usage("org", "llm_tokens", *february) == 7
    assert usage("org", "llm_tokens", *march) == 0


@any_backdate()
def test_arbitrary_ranges_combine_rollups_and_partial_hours():
    tree(ORG)
    base = datetime(2026, 5, 10, 12, 0, tzinfo=UTC)
    for minutes, quantity in [(-61, 1), (-30, 2), (0, 4), (15, 8), (59, 16), (60, 32), (125, 64)]:
        record("k1", quantity, timestamp=base + timedelta(minutes=minutes))

    def between(start_minutes, end_minutes):
        return usage("p1", "llm_tokens", base + timedelta(minutes=start_minutes), base + timedelta(minutes=end_minutes))

    assert between(0, 60) == 4 + 8 + 16
    assert between(10, 20) == 8
    assert between(-45, 61) == 2 + 4 + 8 + 16 + 32
    assert between(-120, 180) == 127
    assert between(15, 15) == 0
    assert usage("p1", "llm_tokens", base, None) == 4 + 8 + 16 + 32 + 64
    assert usage("p1", "llm_tokens", None, base) == 3


def test_usage_query_errors():
    tree(ORG)
    with pytest.raises(InvalidPeriod):
        usage("k1", "llm_tokens", datetime(2026, 1, 1), None)
    with pytest.raises(InvalidPeriod) as backwards:
        usage("k1", "llm_tokens", NOW, NOW - timedelta(hours=1))
    assert backwards.value.field == "end_time"
    with pytest.raises(InvalidFeatureName):
        usage("k1", "")
    with pytest.raises(UnknownTenant):
        usage("ghost")


def test_inactive_tenants_can_still_be_read():
    tree(ORG)
    record("k1", 3)
    Tenant.objects.filter(external_id="k1").update(is_active=False)
    assert usage("k1") == 3


def test_usage_recorded_signal_is_sent_after_commit(django_capture_on_commit_callbacks):
    tree(ORG)
    received = []

    def receiver(sender, event, record_id, context, **kwargs):
        received.append((event.tenant_id, event.quantity, record_id, context.lineage_ids))

    usage_recorded.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            record("k1", "2.5")
            assert received == []
        for callback in callbacks:
            callback()
    finally:
        usage_recorded.disconnect(receiver)
    assert received == [("k1", Decimal("2.5"), UsageRecord.objects.get().pk, ("org", "p1", "k1"))]


def test_a_rolled_back_transaction_leaves_nothing():
    from django.db import transaction

    tree(ORG)
    with pytest.raises(RuntimeError), transaction.atomic():
        record("k1", 5)
        raise RuntimeError("caller changed its mind")
    assert UsageRecord.objects.count() == 0
    assert usage("org") == 0


@pytest.mark.commit_mode(QUERY_COUNT)
def test_recording_cost_in_queries(django_capture_on_commit_callbacks):
    tree(ORG)
    with django_capture_on_commit_callbacks(execute=True):  # as committed: the tree's feature is known from now on
        record("k1", 1)  # warms the lineage cache
    with CaptureQueriesContext(connection) as queries:
        record("k1", 1)
    # SQLite: insert-fact + rollup upsert. PostgreSQL: the tree's advisory lock first. Plus the lineage query when
    # the cache is per-process (LocMem): no other process could invalidate it there.
    from tenants.lineage import cache_is_shared

    expected = (3 if connection.vendor == "postgresql" else 2) + (0 if cache_is_shared() else 1)
    sent = [q["sql"] for q in queries.captured_queries if not q["sql"].startswith(("SAVEPOINT", "RELEASE"))]
    assert len(sent) == expected, sent


def test_async_api_records_and_reads(transactional_db):
    tree(ORG)
    meter = get_meter()

    async def scenario():
        await meter.record_usage(UsageEvent("k1", "llm_tokens", 3))
        await meter.record_usage(UsageEvent("k3", "llm_tokens", "0.5", transaction_id="a-1"))
        with pytest.raises(DuplicateUsageEvent):
            await meter.record_usage(UsageEvent("k3", "llm_tokens", "0.5", transaction_id="a-1"))
        with pytest.raises(InvalidQuantity):
            await meter.record_usage(UsageEvent("k3", "llm_tokens", -1))
        total = await meter.get_usage("org", "llm_tokens", None, None)
        await sync_to_async(connections.close_all)()  # the ORM's worker thread would keep the test DB open
        return total

    assert asyncio.run(scenario()) == Decimal("3.5")


def test_a_concurrent_move_is_detected_and_the_fact_follows_the_new_lineage():
    from tenants.lineage import get_context
    from tenants.tree import move_tenant

    tree(ORG)
    stale = get_context("k1")  # cached before the move; the move's on_commit never runs in this test
    move_tenant("k1", "p2")
    from metering import recorder

    recorder.record(UsageEvent("k1", "llm_tokens", 4), context=stale)
    assert usage("p2") == 4
    assert usage("p1") == 0
    assert usage("org") == 4
