"""``metering.bulk.record_many`` / ``record_usage_many``: a batch is validated first, then written all or nothing in
one transaction; facts == rollups == live counters; duplicates per index, never an error."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db.models import Sum

from metering import InvalidBatch, UsageEvent, counters, get_meter, log
from metering.bulk import record_many
from metering.events import quantity_to_units
from metering.models import UsageRecord, UsageRollup
from metering.protocol import BulkMeteringProtocol
from metering.signals import usage_recorded
from metering.windows import window
from tenants.lineage import get_context
from tenants.models import Tenant
from tenants.tree import create_tenant
from tests.factories import record, tree, usage
from tests.modes import FEATURE_BOUND, WRITE_UNIT

pytestmark = pytest.mark.django_db

ORG = {"org": None, "p1": "org", "p2": "org", "k1": "p1", "k2": "p1", "k3": "p2", "other": None, "o1": "other"}
NOW = datetime.now(UTC).replace(microsecond=0)


def ev(tenant_id: str, quantity: Any = 1, transaction_id: str | None = "tx", **kwargs: Any) -> UsageEvent:
    feature = str(kwargs.pop("feature", "llm_tokens"))
    return UsageEvent(tenant_id, feature, quantity, transaction_id=transaction_id, **kwargs)


def random_tree(rng: random.Random, size: int) -> list[str]:
    ids = ["r0"]
    create_tenant("r0", kind="organization")
    for index in range(1, size):
        tenant_id = f"r{index}"
        create_tenant(tenant_id, parent=ids[rng.randrange(index)])
        ids.append(tenant_id)
    return ids


def subtree_units(tenant_id: str, feature: str, since: datetime) -> int:
    path = Tenant.objects.get(external_id=tenant_id).path
    rows = UsageRecord.objects.filter(tenant__path__startswith=path, feature=feature, timestamp__gte=since)
    return int(rows.aggregate(total=Sum("units"))["total"] or 0)


def test_the_meter_offers_batches():
    assert isinstance(get_meter(), BulkMeteringProtocol)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_large_random_batch_over_a_random_tree_is_exact_in_facts_rollups_and_counters(seed, redis_cache):
    rng = random.Random(seed)
    ids = random_tree(rng, 15)
    features = ["llm_tokens", "api_calls", "gpu_seconds"]
    month = window("month", NOW)[0]
    assert month is not None
    start = max(month, NOW - timedelta(days=3))
    for tenant_id in ids:  # live counters exist (built from the database) before the batch
        for feature in features:
            assert usage(tenant_id, feature, month, None) == 0
    events = [
        ev(
            rng.choice(ids),
            Decimal(rng.randrange(0, 10**9)) / 10**6,
            f"tx-{i}",
            feature=rng.choice(features),
            timestamp=start + timedelta(seconds=rng.randrange(0, int((NOW - start).total_seconds()) + 1)),
        )
        for i in range(3000)
    ]
    result = get_meter().record_usage_many_sync(events)  # type: ignore[attr-defined]
    assert result.created_count == 3000 and result.duplicates == ()
    assert UsageRecord.objects.count() == 3000
    root_pk = Tenant.objects.get(external_id="r0").pk
    assert counters.compare_live(root_pk, repair=False, using="default") == []
    for tenant_id in ids:
        for feature in features:
            expected = subtree_units(tenant_id, feature, month)
            assert quantity_to_units(usage(tenant_id, feature, month, None)) == expected  # live counter
            context = get_context(tenant_id)
            rolled = UsageRollup.objects.filter(tenant_id=context.tenant.pk, feature=feature, bucket__gte=month)
            assert int(rolled.aggregate(total=Sum("units"))["total"] or 0) == expected  # rollups
    total = sum(quantity_to_units(event.quantity) for event in events)
    assert int(UsageRecord.objects.aggregate(total=Sum("units"))["total"]) == total


def test_duplicates_inside_a_batch_and_across_batches_are_reported_per_index_and_counted_once():
    tree(ORG)
    meter = get_meter()
    first = meter.record_usage_many_sync([ev("k1", 1, "a"), ev("k1", 2, "b"), ev("k1", 4, "a"), ev("k2", 8, "a")])  # type: ignore[attr-defined]
    assert sorted(first.created) == [0, 1, 3]
    assert first.duplicates == (2,)
    second = meter.record_usage_many_sync([ev("k1", 16, "b"), ev("k1", 32, "c"), ev("k2", 64, "a")])  # type: ignore[attr-defined]
    assert sorted(second.created) == [1]
    assert second.duplicates == (0, 2)
    assert usage("org") == Decimal(1 + 2 + 8 + 32)
    assert usage("p1") == Decimal(1 + 2 + 8 + 32)
    assert UsageRecord.objects.count() == 4


def test_an_all_duplicate_batch_writes_nothing():
    tree(ORG)
    record("k1", 5, transaction_id="a")
    result = get_meter().record_usage_many_sync([ev("k1", 7, "a")])  # type: ignore[attr-defined]
    assert result.created == {} and result.duplicates == (0,)
    assert usage("org") == Decimal(5)


def test_one_bad_event_refuses_the_whole_batch_with_errors_per_index():
    tree(ORG)
    batch = [
        ev("k1", 1, "ok-0"),
        ev("k1", 1, "nul", feature="llm\x00tokens"),
        ev("k1", 1, "sur", metadata={"model": "\ud800"}),
        ev("k1", "1e400", "huge"),
        ev("k1", 1, "old", timestamp=datetime(1969, 12, 31, tzinfo=UTC)),
        ev("k1", 1, "naive", timestamp=datetime(2026, 1, 1)),
        ev("k1", 1, "tx\x00id"),
        ev("nobody", 1, "unknown"),
        ev("k1", "١٢", "digits"),  # Arabic-Indic digits
        ev("k1", -1, "neg", feature="bad name"),
        "not an event",
        ev("k1", 1, "ok-11"),
    ]
    with pytest.raises(InvalidBatch) as caught:
        record_many(batch)  # type: ignore[arg-type]
    errors = caught.value.errors
    assert sorted(errors) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert set(errors[1]) == {"feature_name"}
    assert set(errors[2]) == {"metadata"}
    assert set(errors[3]) == {"quantity"}
    assert set(errors[4]) == {"timestamp"} and set(errors[5]) == {"timestamp"}
    assert set(errors[6]) == {"transaction_id"}
    assert caught.value.codes[7] == {"tenant_id": ["unknown_tenant"]}
    assert set(errors[8]) == {"quantity"}
    assert set(errors[9]) == {"feature_name", "quantity"}  # every bad field, not only the first
    assert set(errors[10]) == {"event"}
    assert UsageRecord.objects.count() == 0
    assert UsageRollup.objects.count() == 0


@pytest.mark.commit_mode(WRITE_UNIT)
def test_an_error_mid_batch_leaves_nothing_half_written(redis_cache):
    tree(ORG)
    record("k1", 5, transaction_id="before")
    assert usage("org") == Decimal(5)  # the live counters exist
    seen: list[str] = []

    def failing(valid, record_id, context):
        seen.append(valid.transaction_id)
        if len(seen) == 30:
            raise RuntimeError("the outbox failed")

    with pytest.raises(RuntimeError):
        record_many([ev("k1", 1, f"tx-{i}") for i in range(50)], on_stored=failing)
    assert len(seen) == 30
    assert UsageRecord.objects.count() == 1
    assert usage("org") == Decimal(5) and usage("k1") == Decimal(5)
    root_pk = Tenant.objects.get(external_id="org").pk
    assert counters.compare_live(root_pk, repair=False, using="default") == []
    # The same batch again, now that nothing fails, is stored once.
    assert record_many([ev("k1", 1, f"tx-{i}") for i in range(50)]).created_count == 50
    assert usage("org") == Decimal(55)


def test_a_tenant_deactivated_after_its_lineage_was_cached_refuses_the_batch():
    tree(ORG)
    context = get_context("k2")
    Tenant.objects.filter(external_id="k2").update(is_active=False)
    with pytest.raises(InvalidBatch) as caught:
        record_many([ev("k1", 1, "a"), ev("k2", 1, "b")], contexts=[None, context])
    assert caught.value.codes == {1: {"tenant_id": ["inactive_tenant"]}}
    assert UsageRecord.objects.count() == 0


def test_usage_recorded_fires_once_per_inserted_fact_after_commit(django_capture_on_commit_callbacks):
    tree(ORG)
    record("k1", 1, transaction_id="old")
    got: list[tuple[str, int]] = []

    def receiver(sender, event, record_id, context, **kwargs):
        got.append((event.transaction_id, record_id))

    usage_recorded.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            result = record_many([ev("k1", 1, "old"), ev("k1", 1, "n1"), ev("k3", 1, "n2")])
        assert got == []  # not before the commit
        for callback in callbacks:
            callback()
    finally:
        usage_recorded.disconnect(receiver)
    # Log mode fires at drain time with the drained fact's id (result.created holds 0 until then).
    stored = dict(UsageRecord.objects.filter(transaction_id__in=["n1", "n2"]).values_list("transaction_id", "id"))
    assert sorted(got) == sorted(stored.items()) and len(got) == 2
    if not log.is_log_mode():
        assert stored == {"n1": result.created[1], "n2": result.created[2]}


def test_the_async_twin_stores_the_batch():
    tree(ORG)

    async def run():
        return await get_meter().record_usage_many([ev("k1", 2, "a"), ev("o1", 3, "a")])  # type: ignore[attr-defined]

    from asgiref.sync import async_to_sync

    result = async_to_sync(run)()
    assert result.created_count == 2
    assert usage("org") == Decimal(2) and usage("other") == Decimal(3)


@pytest.mark.commit_mode(FEATURE_BOUND)
def test_too_many_features_is_reported_at_each_index_carrying_the_refused_feature(settings):
    settings.METERING = {**settings.METERING, "MAX_FEATURES_PER_TREE": 2}
    tree(ORG)
    with pytest.raises(InvalidBatch) as caught:
        record_many([ev("k1", 1, "a", feature="f1"), ev("k1", 1, "b", feature="f2"), ev("k2", 1, "c", feature="f3")])
    assert caught.value.codes == {2: {"feature_name": ["too_many_features"]}}
    assert UsageRecord.objects.count() == 0
