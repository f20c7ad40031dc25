"""Real worker processes started and killed per test (PostgreSQL + RabbitMQ configuration): the after-commit
trigger on its own, a worker SIGKILLed in the middle of a batch, and a dead letter fixed by a redeploy."""

from __future__ import annotations

import json
import uuid
from io import StringIO

import pytest
from django.core.management import call_command

from metering.models import UsageOutbox
from metering.tasks import sweep_outbox
from tests.lago_server import FakeLago
from tests.lago_support import (
    API_KEY,
    REFUSAL,
    REFUSED,
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


@pytest.fixture
def deployment(django_db_setup, settings, tmp_path):
    """A fake Lago, a private queue, and a way to start workers that are all stopped at the end."""
    require_worker_services()
    server = FakeLago(API_KEY, refuse_codes={REFUSED: "undefined variable 'x'"}).start()
    queue = f"lago-test-{uuid.uuid4().hex[:12]}"
    metering = lago_metering(server.url, CELERY_QUEUE=queue, BATCH_SIZE=20, SINK_LEASE_SECONDS=4)
    settings.METERING = metering
    workers: list[CeleryWorker] = []

    def start(beat: bool = True, **overrides) -> CeleryWorker:
        worker = CeleryWorker({**metering, **overrides}, beat=beat, tmp=tmp_path, name=f"lago-{len(workers)}")
        workers.append(worker.start())
        return worker

    try:
        yield server, start, queue
    finally:
        for worker in workers:
            worker.stop()
        server.stop()
        delete_queue(queue)


def assert_exactly_once(server, expected):
    assert server.stored_transaction_ids() == dict.fromkeys(expected, 1)
    assert server.double_billed() == []
    assert states() == {"delivered": len(expected)}


def test_the_after_commit_trigger_alone_delivers_a_full_batch(deployment, org):
    server, start, queue = deployment
    worker = start(beat=False)  # no sweep: only the trigger can queue a flush
    expected = record_many(20)  # exactly BATCH_SIZE
    wait_until(lambda: states() == {"delivered": 20}, "the triggered flush", worker=worker)
    stragglers = record_many(5, prefix="straggler")
    sweep_outbox.apply_async(queue=queue)  # what beat sends every few seconds
    wait_until(lambda: states() == {"delivered": 25}, "the sweep", worker=worker)
    assert_exactly_once(server, expected + stragglers)


@pytest.mark.parametrize("fault", ["hold_after_store", "hold_before_store"])
def test_a_worker_killed_mid_batch_loses_nothing_and_bills_nothing_twice(deployment, org, fault):
    server, start, _ = deployment
    server.fail(fault)  # the first request is held open: Lago has (or has not) stored it, no answer yet
    first = start()
    expected = record_many(60)
    wait_until(server.held.is_set, "a batch in flight", worker=first)
    first.kill()  # SIGKILL: main process, pool processes and beat, mid-request
    in_flight = next(request.keys for request in server.requests if request.fault == fault)
    assert len(in_flight) == 20
    lago_ids = {
        f"{tenant_id}/{tx}"
        for tenant_id, tx in UsageOutbox.objects.values_list(
            "record__tenant__external_id", "record__transaction_id"
        ).filter(state="pending")
    }
    assert set(in_flight) <= lago_ids  # nobody marked the batch in flight
    server.release()
    second = start()
    wait_until(lambda: states() == {"delivered": 60}, "everything delivered by the new worker", worker=second)
    assert_exactly_once(server, expected)
    sent = server.sent_counts()
    assert all(sent[key] >= 2 for key in in_flight)  # the batch in flight was sent again after the lease


def test_a_dead_letter_is_visible_and_resent_after_the_fix_is_deployed(deployment, org, settings, admin_client):
    server, start, _ = deployment
    first = start()
    expected = record_many(10)
    record("key1", 1, transaction_id="bad", feature=REFUSED)
    wait_until(lambda: states() == {"delivered": 10, "dead": 1}, "one dead letter", worker=first)
    out = StringIO()
    call_command("metering_status", "--json", stdout=out)
    status = json.loads(out.getvalue())["sinks"][0]
    assert status["counts"]["dead"] == 1
    assert status["dead_samples"][0]["transaction_id"] == "bad"
    assert status["dead_samples"][0]["error"] == f"422 {REFUSAL}"
    # the fix: the feature goes to another metric; deployed = workers restarted with the new settings
    first.stop()
    fixed = {"LAGO_METRICS": {REFUSED: "llm_tokens"}}
    settings.METERING = {**settings.METERING, **fixed}
    second = start(**fixed)
    dead = UsageOutbox.objects.get(state="dead")
    response = admin_client.post(
        "/admin/xaas_metering/usageoutbox/", {"action": "resend", "_selected_action": [dead.pk]}, follow=True
    )
    assert "1 facts queued again" in response.content.decode()
    wait_until(lambda: states() == {"delivered": 11}, "the dead letter delivered", worker=second)
    assert_exactly_once(server, [*expected, "key1/bad"])
