"""The delivery guarantees with real processes: a Celery worker (prefork, two pool processes, embedded beat sweeping
every 0.5 s) on RabbitMQ and the PostgreSQL test database, delivering to the strict fake Lago over HTTP.

Runs in the PostgreSQL configuration (make test's second run); the worker killed mid-batch and the dead letter
fixed by a redeploy are in test_lago_worker_restarts.py.
"""

from __future__ import annotations

import uuid

import pytest

from metering.models import SinkState, UsageOutbox
from tenants.models import Tenant
from tests.lago_server import FakeLago
from tests.lago_support import (
    API_KEY,
    CeleryWorker,
    delete_queue,
    lago_metering,
    record,
    record_many,
    require_worker_services,
    states,
    wait_until,
)

pytest_plugins = ["tests.lago_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)

SWEEP_DONE = ("Task metering.sweep_outbox[", "] succeeded")


@pytest.fixture(scope="module")
def running(django_db_setup, tmp_path_factory):
    require_worker_services()
    server = FakeLago(API_KEY).start()
    queue = f"lago-test-{uuid.uuid4().hex[:12]}"
    metering = lago_metering(server.url, CELERY_QUEUE=queue, BATCH_SIZE=20, SINK_LEASE_SECONDS=4)
    worker = CeleryWorker(metering, beat=True, tmp=tmp_path_factory.mktemp("lago-worker"), name="lago-a").start()
    try:
        yield server, worker, metering
    finally:
        worker.stop()
        server.stop()
        delete_queue(queue)


@pytest.fixture
def worker(running, settings):
    server, worker, metering = running
    server.reset()
    settings.METERING = metering
    return server, worker


def assert_exactly_once(server, expected):
    assert server.stored_transaction_ids() == dict.fromkeys(expected, 1)
    assert server.double_billed() == []
    assert states() == {"delivered": len(expected)}


def test_every_committed_fact_arrives_once_and_no_rolled_back_one(worker, org):
    from django.db import transaction

    server, process = worker
    expected = record_many(70)  # three full batches (after-commit trigger) and ten stragglers (the beat sweep)
    for index in range(5):
        with pytest.raises(RuntimeError), transaction.atomic():
            record("key1", 1, transaction_id=f"rolled-back-{index}")
            raise RuntimeError("the caller's transaction fails")
    wait_until(lambda: states() == {"delivered": 70}, "70 delivered", worker=process)
    assert_exactly_once(server, expected)
    # two pool processes, the trigger and the sweeps in parallel: no fact was even sent twice
    assert set(server.sent_counts().values()) == {1}


@pytest.mark.parametrize(
    ("fault", "params"),
    [
        ("500", {}),
        ("503", {"retry_after": "1"}),
        ("429", {"reset": "1"}),
        ("slow", {"delay": 1.5}),
        ("drop_before_store", {}),
        ("drop_after_store", {}),
    ],
)
def test_every_committed_fact_arrives_once_under_failures(worker, org, fault, params):
    server, process = worker
    server.fail(fault, times=3, **params)
    # Ids of this case only: a late answer of an earlier case can never collide with them.
    expected = record_many(50, prefix=f"tx-{fault}")
    wait_until(lambda: states() == {"delivered": 50}, f"50 delivered despite {fault}", worker=process)
    assert_exactly_once(server, expected)
    assert not server.faults  # all three faults really happened
    assert UsageOutbox.objects.filter(attempts__gte=2).exists()  # and were retried


def test_a_refused_key_stops_the_worker_until_an_operator_resumes(worker, org, admin_client):
    server, process = worker
    server.keys = {"someone-elses-key": "write"}
    expected = record_many(30)
    wait_until(lambda: SinkState.objects.filter(sink="lago", blocked_status=401).exists(), "blocked", worker=process)
    wait_until(lambda: not UsageOutbox.objects.exclude(claim_token="").exists(), "claims released", worker=process)
    sweeps = process.log_count(*SWEEP_DONE)
    wait_until(lambda: process.log_count(*SWEEP_DONE) >= sweeps + 2, "two more sweeps", worker=process)
    refused = len(server.requests)
    assert refused <= 3  # only flushes already past the check when the block landed sent anything
    sweeps = process.log_count(*SWEEP_DONE)
    wait_until(lambda: process.log_count(*SWEEP_DONE) >= sweeps + 4, "four more sweeps", worker=process)
    assert len(server.requests) == refused  # no retry burning while blocked
    assert states() == {"pending": 30}
    assert set(UsageOutbox.objects.values_list("attempts", flat=True)) == {0}
    # fixed on Lago's side; the operator resumes from the admin
    server.keys = {API_KEY: "write"}
    state = SinkState.objects.get(sink="lago")
    response = admin_client.post(
        "/admin/xaas_metering/sinkstate/", {"action": "resume", "_selected_action": [state.pk]}, follow=True
    )
    assert response.status_code == 200 and "Resumed: lago" in response.content.decode()
    wait_until(lambda: states() == {"delivered": 30}, "30 delivered after resume", worker=process)
    assert_exactly_once(server, expected)


def test_held_facts_are_released_by_the_sweep_once_the_tenant_has_a_subscription(worker, org):
    server, process = worker
    record("other", 3, transaction_id="waiting")
    expected = record_many(5)
    wait_until(lambda: states() == {"delivered": 5, "held": 1}, "held", worker=process)
    Tenant.objects.filter(external_id="other").update(lago_subscription_id="sub-other")
    wait_until(lambda: states() == {"delivered": 6}, "released and delivered", worker=process)
    assert_exactly_once(server, [*expected, "other/waiting"])
    assert server.events()[0]["external_subscription_id"] in ("sub-org", "sub-other")
    assert {e["transaction_id"]: e["external_subscription_id"] for e in server.events()}["other/waiting"] == "sub-other"
