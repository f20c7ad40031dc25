"""``record_many`` in log mode: one Lua call per tree appends the tree's facts of a batch (all or none), counts them
in the live counters, de-duplicates them; the drainer (whose insert is ``bulk.insert_facts``) persists them exactly."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from metering import UsageEvent, counters, drain, log
from metering.bulk import record_many
from metering.models import UsageRecord
from metering.windows import window
from tenants.models import Tenant
from tests.factories import tree, usage
from tests.log_helpers import assert_facts_match_rollups, log_mode

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]

ORG = {"org": None, "p1": "org", "p2": "org", "k1": "p1", "k2": "p1", "k3": "p2", "other": None, "o1": "other"}


@pytest.fixture
def logged(redis_cache):
    with log_mode():
        yield redis_cache


def ev(tenant_id: str, quantity: Any, transaction_id: str, **kwargs: Any) -> UsageEvent:
    return UsageEvent(tenant_id, "llm_tokens", quantity, transaction_id=transaction_id, **kwargs)


def month() -> tuple[datetime | None, datetime | None]:
    return window("month", datetime.now(UTC))  # an exact window: served from the live counter


def test_a_batch_is_appended_counted_and_drained_exactly(logged):
    tree(ORG)
    assert usage("org", "llm_tokens", *month()) == 0  # live counters exist
    rng = random.Random(7)
    now = datetime.now(UTC)
    tenants = ["org", "p1", "p2", "k1", "k2", "k3", "o1"]
    events = [
        ev(rng.choice(tenants), rng.randrange(1, 1000), f"tx-{i}", timestamp=now - timedelta(minutes=rng.randrange(90)))
        for i in range(1500)
    ]
    events.append(ev(events[3].tenant_id, 5, "tx-3"))  # twice in the batch
    result = record_many(events)
    assert len(result.created) == 1500 and result.duplicates == (1500,)
    org = Tenant.objects.get(external_id="org").pk
    assert logged.xlen(log.stream_key(org)) == sum(1 for e in events[:1500] if e.tenant_id != "o1")
    expected = sum(int(e.quantity) for e in events[:1500] if e.tenant_id != "o1")
    assert usage("org", "llm_tokens", *month()) == Decimal(expected)  # counted before the drain
    again = record_many([ev("k1", 1, "fresh"), events[0]])  # across batches: in the window
    assert sorted(again.created) == [0] and again.duplicates == (1,)
    drain.drain()
    assert UsageRecord.objects.count() == 1501
    assert_facts_match_rollups()
    assert counters.compare_live(org, repair=False, using="default") == []
    assert usage("org", "llm_tokens", *month()) == Decimal(expected + 1)


def test_a_stale_epoch_is_repaired_and_the_batch_appended_once(logged):
    tree(ORG)
    record_many([ev("k1", 1, "a")])
    org = Tenant.objects.get(external_id="org").pk
    counters.bump_epochs([org], "default")  # outside any test transaction: Redis's state now lags the database
    result = record_many([ev("k1", 2, "b"), ev("k2", 3, "c")])
    assert len(result.created) == 2
    drain.drain()
    assert sorted(UsageRecord.objects.values_list("transaction_id", flat=True)) == ["a", "b", "c"]
    assert usage("org") == Decimal(6)
