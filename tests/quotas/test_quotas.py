"""Quota semantics on both decision paths (database; Redis when the fixture provides it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from metering.models import UsageRecord
from metering.windows import window
from quotas.exceptions import QuotaExceeded
from quotas.handler import QuotaPolicyHandler, expire_reservations
from quotas.models import QuotaReservation
from quotas.signals import quota_exceeded, quota_threshold_reached
from tests.factories import record, tree, usage
from tests.quota_helpers import limit, set_exempt

pytestmark = pytest.mark.django_db

ORG = {"org": None, "p1": "org", "p2": "org", "k1": "p1", "k2": "p1", "k3": "p2"}


@pytest.fixture(params=["database", "redis"])
def backend(request):
    if request.param == "redis":
        request.getfixturevalue("redis_cache")
    return request.param


def month_usage(tenant_id: str) -> Decimal:
    return usage(tenant_id, "llm_tokens", *window("month", datetime.now(UTC)))


def test_every_level_must_have_room_and_the_tightest_wins(backend):
    tree(ORG)
    limit("org", 10)
    limit("p1", 6)
    handler = QuotaPolicyHandler("k1")
    decision = handler.consume("llm_tokens", 4)
    assert decision.tightest.tenant_id == "p1" and decision.tightest.remaining == 2
    with pytest.raises(QuotaExceeded) as blocked:
        handler.consume("llm_tokens", 3)
    error = blocked.value
    assert (error.tenant_id, error.feature, error.limit, error.used, error.requested, error.period) == (
        "p1",
        "llm_tokens",
        Decimal(6),
        Decimal(4),
        Decimal(3),
        "month",
    )
    assert error.reset_at == window("month", datetime.now(UTC))[1]
    handler.consume("llm_tokens", 2)  # exactly to the limit is allowed
    QuotaPolicyHandler("k3").consume("llm_tokens", 4)  # the organization's last room
    with pytest.raises(QuotaExceeded) as org_blocked:
        QuotaPolicyHandler("k3").consume("llm_tokens", "0.000001")
    assert org_blocked.value.tenant_id == "org"
    assert month_usage("org") == 10


def test_a_rejection_consumes_nothing_at_any_level(backend):
    tree(ORG)
    limit("org", 100)
    limit("k1", 5)
    QuotaPolicyHandler("k1").consume("llm_tokens", 5)
    for _ in range(20):
        with pytest.raises(QuotaExceeded):
            QuotaPolicyHandler("k1").consume("llm_tokens", 1)
    assert month_usage("org") == 5 and month_usage("p1") == 5
    assert UsageRecord.objects.count() == 1
    QuotaPolicyHandler("k2").consume("llm_tokens", 95)  # the parent's room is intact
    assert month_usage("org") == 100


def test_zero_limit_blocks_everything_and_zero_quantity_only_checks(backend):
    tree(ORG)
    limit("p2", 0)
    with pytest.raises(QuotaExceeded):
        QuotaPolicyHandler("k3").consume("llm_tokens", "0.000001")
    decision = QuotaPolicyHandler("k3").consume("llm_tokens", 0)
    assert decision.allowed
    assert UsageRecord.objects.count() == 0


def test_no_quota_means_unlimited_and_other_features_are_independent(backend):
    tree(ORG)
    limit("org", 1, feature="api_calls")
    assert QuotaPolicyHandler("k1").consume("llm_tokens", 10**9).allowed
    QuotaPolicyHandler("k1").consume("api_calls", 1)
    with pytest.raises(QuotaExceeded):
        QuotaPolicyHandler("k2").consume("api_calls", 1)


def test_an_exempt_subtree_is_recorded_but_never_blocked(backend):
    tree({**ORG, "internal": "org", "batch": "internal"})
    limit("org", 10)
    limit("internal", 1)
    set_exempt("internal")
    for _ in range(5):
        QuotaPolicyHandler("batch").consume("llm_tokens", 7)
    assert month_usage("internal") == 35
    assert month_usage("org") == 35  # fully recorded, and it counts at the organization
    with pytest.raises(QuotaExceeded):  # so the others are blocked by what the exempt subtree used
        QuotaPolicyHandler("k1").consume("llm_tokens", 1)


def test_soft_quotas_record_and_warn_but_never_block(backend, django_capture_on_commit_callbacks):
    tree(ORG)
    limit("p1", 5, enforcement="soft")
    reached = []

    def receiver(sender, status, threshold, **kwargs):
        reached.append(threshold)

    quota_threshold_reached.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            for _ in range(4):
                QuotaPolicyHandler("k1").consume("llm_tokens", 2)
    finally:
        quota_threshold_reached.disconnect(receiver)
    assert month_usage("p1") == 8
    assert reached == [80, 100]


def test_threshold_signals_fire_once_per_threshold_per_window(backend, django_capture_on_commit_callbacks):
    tree(ORG)
    limit("org", 10, warning_thresholds=[50, 80, 100])
    reached = []

    def receiver(sender, context, status, threshold, **kwargs):
        reached.append((status.tenant_id, threshold))

    quota_threshold_reached.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            QuotaPolicyHandler("k1").consume("llm_tokens", 4)
            QuotaPolicyHandler("k1").consume("llm_tokens", 4)  # crosses 50 and 80 at once
            QuotaPolicyHandler("k1").consume("llm_tokens", 1)
            QuotaPolicyHandler("k1").consume("llm_tokens", 1)  # reaches 100
            with pytest.raises(QuotaExceeded):
                QuotaPolicyHandler("k1").consume("llm_tokens", 1)
    finally:
        quota_threshold_reached.disconnect(receiver)
    assert reached == [("org", 50), ("org", 80), ("org", 100)]


def test_quota_exceeded_signal(backend):
    tree(ORG)
    limit("k1", 1)
    seen = []

    def receiver(sender, context, error, **kwargs):
        seen.append((context.tenant_id, error.tenant_id))

    quota_exceeded.connect(receiver)
    try:
        with pytest.raises(QuotaExceeded):
            QuotaPolicyHandler("k1").consume("llm_tokens", 2)
    finally:
        quota_exceeded.disconnect(receiver)
    assert seen == [("k1", "k1")]


def test_several_periods_stand_together(backend):
    tree(ORG)
    limit("p1", 3, period="hour")
    limit("p1", 5, period="total")
    QuotaPolicyHandler("k1").consume("llm_tokens", 3)
    with pytest.raises(QuotaExceeded) as hourly:
        QuotaPolicyHandler("k1").consume("llm_tokens", 1)
    assert hourly.value.period == "hour"
    assert hourly.value.retry_after is not None and 0 < hourly.value.retry_after <= 3600


def test_window_rollover_gives_room_back(backend):
    tree(ORG)
    limit("p1", 5, period="hour")
    last_hour = datetime.now(UTC) - timedelta(hours=1)
    record("k1", 5, timestamp=last_hour)  # the previous hour is full
    assert QuotaPolicyHandler("k1").consume("llm_tokens", 5).allowed  # this hour is a new window
    with pytest.raises(QuotaExceeded):
        QuotaPolicyHandler("k1").consume("llm_tokens", 1)


def test_plain_recording_counts_against_quotas(backend):
    tree(ORG)
    limit("org", 10)
    QuotaPolicyHandler("k1").check("llm_tokens", 1)  # counters exist (Redis) before the plain record
    record("k2", 9)
    with pytest.raises(QuotaExceeded):
        QuotaPolicyHandler("k1").consume("llm_tokens", 2)
    assert QuotaPolicyHandler("k1").consume("llm_tokens", 1).allowed


def test_check_consumes_nothing(backend):
    tree(ORG)
    limit("org", 10)
    QuotaPolicyHandler("k1").consume("llm_tokens", 6)
    decision = QuotaPolicyHandler("k2").check("llm_tokens", 4)
    assert decision.allowed and decision.tightest.remaining == 4
    refused = QuotaPolicyHandler("k2").check("llm_tokens", 5)
    assert not refused.allowed and refused.blocked.tenant_id == "org"
    assert month_usage("org") == 6


def test_reservation_commit_records_the_actual_and_returns_the_difference(backend):
    tree(ORG)
    limit("org", 10)
    handler = QuotaPolicyHandler("k1")
    reservation = handler.reserve("llm_tokens", 8)
    with pytest.raises(QuotaExceeded):  # the reservation holds room at every level
        QuotaPolicyHandler("k3").consume("llm_tokens", 3)
    assert month_usage("org") == 0  # a reservation is not usage
    reservation.commit(5)
    assert month_usage("org") == 5 and month_usage("k1") == 5
    assert QuotaReservation.objects.get().state == "committed"
    assert QuotaReservation.objects.get().record_id == UsageRecord.objects.get().pk
    QuotaPolicyHandler("k3").consume("llm_tokens", 5)
    with pytest.raises(QuotaExceeded):
        QuotaPolicyHandler("k3").consume("llm_tokens", 1)


def test_reservation_commit_beyond_the_estimate_is_recorded_not_refused(backend):
    tree(ORG)
    limit("org", 10)
    with QuotaPolicyHandler("k1").reserve("llm_tokens", 4) as reservation:
        reservation.commit(12)
    assert month_usage("org") == 12
    with pytest.raises(QuotaExceeded):
        QuotaPolicyHandler("k1").consume("llm_tokens", 1)


def test_reservation_release_and_context_manager(backend):
    tree(ORG)
    limit("org", 10)
    with pytest.raises(RuntimeError), QuotaPolicyHandler("k1").reserve("llm_tokens", 10):
        raise RuntimeError("the model call failed")
    assert QuotaReservation.objects.get().state == "released"
    assert QuotaPolicyHandler("k1").consume("llm_tokens", 10).allowed
    assert month_usage("org") == 10


def test_an_abandoned_reservation_expires_by_itself(backend):
    tree(ORG)
    limit("org", 10)
    QuotaPolicyHandler("k1").reserve("llm_tokens", 10, ttl=timedelta(microseconds=1))  # past its time at once
    # The next decision that finds no room expires the tree's abandoned reservations and decides again.
    assert QuotaPolicyHandler("k2").consume("llm_tokens", 10).allowed
    assert QuotaReservation.objects.get().state == "expired"


def test_expire_reservations_sweeps_only_due_ones(backend):
    tree(ORG)
    limit("org", 10)
    QuotaPolicyHandler("k1").reserve("llm_tokens", 3, ttl=timedelta(microseconds=1))
    QuotaPolicyHandler("k1").reserve("llm_tokens", 3)
    assert expire_reservations() == 1
    assert sorted(QuotaReservation.objects.values_list("state", flat=True)) == ["active", "expired"]
    assert QuotaPolicyHandler("k2").check("llm_tokens", 7).allowed
    assert not QuotaPolicyHandler("k2").check("llm_tokens", 8).allowed


def test_async_forms(backend, transactional_db):
    import asyncio

    from asgiref.sync import sync_to_async
    from django.db import connections

    tree(ORG)
    limit("org", 10)

    async def scenario():
        handler = QuotaPolicyHandler("k1")
        await handler.aconsume("llm_tokens", 2)
        async with await handler.areserve("llm_tokens", 5) as reservation:
            await reservation.acommit(3)
        async with await handler.areserve("llm_tokens", 5):
            pass  # released
        refused = await handler.acheck("llm_tokens", 6)
        await sync_to_async(connections.close_all)()
        return refused

    refused = asyncio.run(scenario())
    assert not refused.allowed
    assert month_usage("org") == 5


def test_redis_flushed_between_decisions_rebuilds_before_deciding(redis_cache):
    tree(ORG)
    limit("org", 10)
    QuotaPolicyHandler("k1").consume("llm_tokens", 6)
    reservation = QuotaPolicyHandler("k2").reserve("llm_tokens", 3)
    redis_cache.flushdb()
    with pytest.raises(QuotaExceeded) as blocked:
        QuotaPolicyHandler("k3").consume("llm_tokens", 2)
    assert blocked.value.used == 9  # usage and the open reservation, both rebuilt from the database
    reservation.release()
    assert QuotaPolicyHandler("k3").consume("llm_tokens", 4).allowed


@pytest.mark.django_db(transaction=True)
def test_a_reservation_made_after_its_async_caller_was_cancelled_is_released(monkeypatch):
    """Under ASGI a client that hangs up cancels the view while ``reserve`` runs in a worker thread: the hold it
    makes must not stay at every level until it expires."""
    import asyncio
    import threading
    import time

    from asgiref.sync import async_to_sync, sync_to_async
    from django.db import connections

    tree({"org": None, "k1": "org"})
    limit("org", 10)
    started = threading.Event()
    reserve = QuotaPolicyHandler.reserve

    def slow_reserve(self, *args, **kwargs):  # the worker thread is busy when the caller goes away
        started.set()
        time.sleep(0.1)
        return reserve(self, *args, **kwargs)

    monkeypatch.setattr(QuotaPolicyHandler, "reserve", slow_reserve)

    async def scenario() -> list[str]:
        caller = asyncio.ensure_future(QuotaPolicyHandler("k1").areserve("llm_tokens", 5))
        while not started.is_set():
            await asyncio.sleep(0.005)
        caller.cancel()  # the client hung up
        with pytest.raises(asyncio.CancelledError):
            await caller
        states: list[str] = []
        for _ in range(200):  # the worker thread finishes, then the release runs
            await asyncio.sleep(0.02)
            states = await sync_to_async(lambda: list(QuotaReservation.objects.values_list("state", flat=True)))()
            if states and QuotaReservation.State.ACTIVE not in states:
                break
        await sync_to_async(connections.close_all)()
        return states

    assert async_to_sync(scenario)() == [QuotaReservation.State.RELEASED]
    assert QuotaPolicyHandler("k1").check("llm_tokens", 10).allowed  # nothing is held
