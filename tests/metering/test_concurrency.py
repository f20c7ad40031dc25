"""Concurrency is the normal case: parallel writers, duplicate retries, and Redis lost while they write."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import connections
from django.db.models import Sum

from metering import DuplicateUsageEvent
from metering.models import UsageRecord, UsageRollup
from metering.windows import window
from tests.factories import record, tree, usage
from tests.modes import FLUSH, REBUILD

pytestmark = pytest.mark.django_db(transaction=True)

ORG = {"org": None, "p1": "org", "p2": "org", "k1": "p1", "k2": "p1", "k3": "p2"}


def run_in_threads(count: int, work: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def target(index: int) -> None:
        try:
            start.wait()
            work(index)
        except BaseException as error:  # collected and asserted by the test
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return errors


def facts_sum(tenant_ids: list[str]) -> Decimal:
    units = UsageRecord.objects.filter(tenant__external_id__in=tenant_ids).aggregate(total=Sum("units"))["total"]
    return Decimal(units or 0) / 1_000_000


def check_totals() -> None:
    month = window("month", datetime.now(UTC))
    expected = {
        "org": facts_sum(["org", "p1", "p2", "k1", "k2", "k3"]),
        "p1": facts_sum(["p1", "k1", "k2"]),
        "p2": facts_sum(["p2", "k3"]),
        "k1": facts_sum(["k1"]),
    }
    for tenant_id, total in expected.items():
        assert usage(tenant_id, "llm_tokens", *month) == total, tenant_id
        assert usage(tenant_id, "llm_tokens", None, None) == total, tenant_id
        rollup = UsageRollup.objects.filter(tenant__external_id=tenant_id).aggregate(total=Sum("units"))["total"]
        assert Decimal(rollup) / 1_000_000 == total


def hammer(readers_flush: Callable[[], None] | None) -> None:
    tree(ORG)
    writers, per_writer = 6, 40
    month = window("month", datetime.now(UTC))

    def work(index: int) -> None:
        rng = random.Random(index)
        if index == writers:  # the extra thread reads (building counters) and loses Redis now and then
            for round_ in range(60):
                usage("org", "llm_tokens", *month)
                usage("p1", "llm_tokens", None, None)
                if readers_flush and round_ % 4 == 3:
                    readers_flush()
            return
        for _ in range(per_writer):
            tenant_id = rng.choice(["k1", "k2", "k3", "p1"])
            record(tenant_id, Decimal(rng.randint(1, 10_000)) / 1000)

    errors = run_in_threads(writers + 1, work)
    assert errors == []
    assert UsageRecord.objects.count() == writers * per_writer
    check_totals()


def test_parallel_writers_are_counted_exactly_once_on_the_database_path():
    hammer(None)


@pytest.mark.commit_mode(FLUSH)
def test_parallel_writers_with_redis_flushed_mid_way(redis_cache):
    hammer(redis_cache.flushdb)


def test_concurrent_retries_of_one_transaction_id_store_one_fact():
    tree(ORG)
    outcomes: list[str] = []

    def work(index: int) -> None:
        try:
            record("k1", 9, transaction_id="same-request")
            outcomes.append("stored")
        except DuplicateUsageEvent:
            outcomes.append("duplicate")

    assert run_in_threads(6, work) == []
    assert sorted(outcomes) == ["duplicate"] * 5 + ["stored"]
    assert UsageRecord.objects.count() == 1
    assert usage("org") == 9


@pytest.mark.commit_mode(REBUILD)
def test_a_counter_rebuild_waits_for_the_writer_in_flight(redis_cache):
    """Deterministic interleaving: Redis is lost while a writer has counted but not committed its fact.

    The rebuild must wait for that writer (tree lock exclusive vs shared); otherwise it would set the counter from
    rollups without the fact, the writer's increment having gone to a key that no longer existed.
    """
    from django.db import transaction

    tree(ORG)
    record("k1", 1)
    month = window("month", datetime.now(UTC))
    assert usage("org", "llm_tokens", *month) == 1  # counter exists
    counted, release = threading.Event(), threading.Event()
    results: dict[str, Decimal] = {}

    def writer(index: int) -> None:
        if index == 0:
            with transaction.atomic():
                record("k2", 5)  # counted in Redis; the commit waits for `release`
                counted.set()
                release.wait(10)
        else:
            counted.wait(10)
            redis_cache.flushdb()
            results["read"] = usage("org", "llm_tokens", *month)

    reader_done = threading.Event()

    def run() -> None:
        run_in_threads(2, writer)
        reader_done.set()

    threading.Thread(target=run).start()
    counted.wait(10)
    assert not reader_done.wait(0.5), "the rebuild did not wait for the writer in flight"
    release.set()
    assert reader_done.wait(30)
    assert results["read"] == 6
    assert usage("org", "llm_tokens", *month) == 6
