"""Delivery guarantees, in-process (the flush a worker runs), on both databases: every committed fact arrives at
the strict fake Lago exactly once under each failure, rolled-back facts never, dead letters are visible and
resendable, 401/403 stop delivery without burning retries. The same guarantees with real Celery worker processes
are in test_lago_worker.py (PostgreSQL + RabbitMQ)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from urllib.parse import quote

import pytest
from django.db import connections, transaction
from django.db.models import Min
from django.utils import timezone

from metering.delivery import outbox
from metering.delivery.deliver import delivery_blocked, facts_dead_lettered, flush
from metering.delivery.sinks.base import backoff, retry_after
from metering.models import SinkState, UsageOutbox
from tests.lago_support import API_KEY, REFUSAL, REFUSED, record, record_many, states

pytest_plugins = ["tests.lago_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


def drain(rounds: int = 30) -> datetime:
    """Flush until nothing is pending, moving the clock to each retry time instead of sleeping."""
    now = timezone.now()
    for _ in range(rounds):
        report = flush(now=now)
        assert report.blocked is None, report.blocked
        due = UsageOutbox.objects.filter(state="pending").aggregate(first=Min("next_attempt_at"))["first"]
        if due is None:
            return now
        now = max(now, due) + timedelta(milliseconds=1)
    raise AssertionError(f"still pending after {rounds} rounds: {states()}")


def assert_exactly_once(server, expected: list[str]) -> None:
    assert server.stored_transaction_ids() == dict.fromkeys(expected, 1)
    assert server.double_billed() == []
    assert states() == {"delivered": len(expected)}


def test_committed_facts_arrive_exactly_once_in_batches(lago_settings, org):
    expected = record_many(25)
    report = flush()
    assert (report.delivered, report.batches, report.requests) == (25, 3, 3)
    assert [len(request.keys) for request in lago_settings.requests] == [10, 10, 5]
    assert set(lago_settings.sent_counts().values()) == {1}  # no event was even sent twice
    assert_exactly_once(lago_settings, expected)
    assert flush().requests == 0


def test_facts_of_rolled_back_transactions_never_arrive(lago_settings, org):
    expected = record_many(3, prefix="kept")
    for index in range(3):
        with pytest.raises(RuntimeError), transaction.atomic():
            record("key1", 1, transaction_id=f"lost-{index}")
            raise RuntimeError("rolled back after recording")
    drain()
    assert_exactly_once(lago_settings, expected)


def test_the_request_thread_never_talks_to_lago(lago_settings, org, private_queue):
    record_many(30)  # three times BATCH_SIZE
    assert lago_settings.requests == []
    assert states() == {"pending": 30}
    from project.celery import app

    if not app.conf.task_always_eager:  # with a broker, the commit queued a flush task for the workers instead
        with app.connection_for_write() as conn:
            _, messages, _ = conn.default_channel.queue_declare(private_queue, passive=True)  # type: ignore[attr-defined]
        assert messages >= 1


@pytest.mark.parametrize(
    ("fault", "params"),
    [
        ("500", {}),
        ("503", {"retry_after": "1"}),
        ("429", {"reset": "1"}),
        ("slow", {"delay": 1.5}),  # longer than the 1 s timeout; Lago stores it after the client gave up
        ("drop_before_store", {}),
        ("drop_after_store", {}),  # stored, then the connection drops: the answer is lost
    ],
)
def test_every_committed_fact_arrives_exactly_once_under_failures(lago_settings, org, fault, params):
    expected = record_many(25)
    lago_settings.fail(fault, times=2, **params)
    first = flush()
    assert first.retrying > 0 and first.retry_in is not None
    pending = UsageOutbox.objects.filter(state="pending")
    assert pending.count() > 0 and all(row.attempts == 1 for row in pending if row.last_error)
    drain()
    assert_exactly_once(lago_settings, expected)


def test_a_lost_answer_is_resolved_by_lagos_value_already_exist(lago_settings, org):
    first = record_many(5, prefix="first")
    lago_settings.fail("drop_after_store")
    assert flush().retrying == 5
    assert lago_settings.stored_transaction_ids() == dict.fromkeys(first, 1)  # Lago has them; we don't know
    second = record_many(5, prefix="second")
    later = timezone.now() + timedelta(seconds=5)
    report = flush(now=later)
    # one batch of ten: Lago refuses it naming the five it holds, the five new ones go again at once
    assert (report.batches, report.requests, report.delivered, report.already_present) == (1, 2, 10, 5)
    posts = [request.status for request in lago_settings.requests if request.path.endswith("/batch")]
    assert posts == [None, 422, 200]
    # and each of the five "already there" was confirmed by asking Lago for that event
    checks = [request.path for request in lago_settings.requests if not request.path.endswith("/batch")]
    assert sorted(checks) == sorted(f"/api/v1/events/{quote(tx, safe='')}" for tx in first)
    assert_exactly_once(lago_settings, first + second)


def test_timestamps_are_identical_on_resend_so_clickhouse_lago_never_bills_twice(settings, org, private_queue):
    from tests.lago_server import FakeLago
    from tests.lago_support import lago_metering

    with FakeLago(API_KEY, dedupe="clickhouse") as server:
        settings.METERING = lago_metering(server.url, CELERY_QUEUE=private_queue)
        expected = record_many(12)
        server.fail("drop_after_store", times=3)
        drain()
        assert server.double_billed() == []
        assert server.stored_transaction_ids() == dict.fromkeys(expected, 1)


def test_an_invalid_fact_is_dead_lettered_the_rest_delivered_and_it_is_resendable_once_fixed(
    lago_settings, org, settings
):
    dead_signals = []

    def on_dead(sender, signal, **kwargs):
        dead_signals.append(kwargs)

    expected = record_many(6)
    # Lago cannot evaluate this metric's expression for the event: a string error at its index
    record("key1", 1, transaction_id="bad", feature=REFUSED)
    facts_dead_lettered.connect(on_dead)
    try:
        report = flush()
    finally:
        facts_dead_lettered.disconnect(on_dead)
    assert (report.delivered, report.dead, report.requests) == (6, 1, 2)
    dead = UsageOutbox.objects.get(state="dead")
    assert dead.record.transaction_id == "bad"
    assert dead.last_error == f"422 {REFUSAL}"  # Lago's own words
    assert dead_signals and dead_signals[0]["count"] == 1
    assert outbox.status("lago").dead_samples[0]["transaction_id"] == "bad"
    assert_exactly_once_but(lago_settings, expected)
    # nothing retries a dead letter by itself
    assert flush(now=timezone.now() + timedelta(days=1)).requests == 0
    # fixed: the feature goes to another metric; then resent by the operator. Lago stored nothing of a refused
    # event, so its body is built again with the new settings.
    settings.METERING = {**settings.METERING, "LAGO_METRICS": {REFUSED: "llm_tokens"}}
    assert outbox.resend(UsageOutbox.objects.all()) == 1  # delivered rows are left alone
    assert flush().delivered == 1
    assert_exactly_once(lago_settings, [*expected, "key1/bad"])


def assert_exactly_once_but(server, expected):
    assert server.stored_transaction_ids() == dict.fromkeys(expected, 1)


def test_a_batch_too_big_for_this_lago_is_split_and_nothing_is_lost(lago_settings, org):
    lago_settings.max_batch = 4  # a self-hosted Lago with a lower limit than BATCH_SIZE
    expected = record_many(10)
    report = flush()
    assert report.delivered == 10 and report.dead == 0
    assert_exactly_once(lago_settings, expected)


@pytest.mark.parametrize("refusal", ["401", "403", "404"])
def test_auth_failures_stop_delivery_without_burning_retries(lago_settings, org, settings, refusal):
    blocked = []

    def on_blocked(sender, signal, **kwargs):
        blocked.append(kwargs)

    expected = record_many(15)
    if refusal == "401":
        lago_settings.keys = {"rotated-key": "write"}
    elif refusal == "403":
        lago_settings.keys = {API_KEY: "read"}
    else:
        settings.METERING = {**settings.METERING, "SINK_URL": lago_settings.url + "/wrong-prefix"}
    delivery_blocked.connect(on_blocked)
    try:
        first = flush()
        again = flush(now=timezone.now() + timedelta(hours=1))
    finally:
        delivery_blocked.disconnect(on_blocked)
    assert first.blocked and str(refusal) in first.blocked
    assert again.blocked and again.requests == 0  # stopped: no retry burning
    assert len(lago_settings.requests) == 1
    assert [kwargs["status"] for kwargs in blocked] == [int(refusal)]  # one alert
    assert set(UsageOutbox.objects.values_list("state", "attempts")) == {("pending", 0)}
    state = SinkState.objects.get(sink="lago")
    assert state.blocked_at is not None and state.blocked_status == int(refusal)
    assert any("blocked" in alert for alert in outbox.status("lago").alerts)
    # fixed
    if refusal == "401":
        settings.METERING = {**settings.METERING, "API_KEY": "rotated-key"}  # a new key lifts the block itself
    elif refusal == "403":
        lago_settings.keys = {API_KEY: "write"}  # fixed on Lago's side: the operator resumes
        assert flush().requests == 0
        from metering.delivery.deliver import resume

        assert resume("lago") is True
    else:
        settings.METERING = {**settings.METERING, "SINK_URL": lago_settings.url}
    assert flush().delivered == 15
    assert_exactly_once(lago_settings, expected)
    assert SinkState.objects.get(sink="lago").blocked_at is None


def test_a_worker_dying_mid_batch_only_delays_the_batch(lago_settings, org):
    """In-process stand-in for the SIGKILL test: a batch is claimed and sent, and its worker never marks it."""
    from metering.delivery.sinks import get_sink

    expected = record_many(10)
    now = timezone.now()
    claimed = outbox.claim("lago", 10, now=now, lease_seconds=5, subscriptions={})
    sink = get_sink()
    assert sink.send([sink.build(fact) for fact in claimed.facts]).outcome.value == "ok"  # then it "dies"
    assert flush(now=now).requests == 0  # leased: no other worker takes it meanwhile
    report = flush(now=now + timedelta(seconds=6))  # the lease ran out
    assert (report.delivered, report.already_present) == (10, 10)
    assert_exactly_once(lago_settings, expected)


def test_a_late_worker_cannot_overwrite_the_outcome_of_the_one_that_took_over(lago_settings, org):
    record_many(3)
    now = timezone.now()
    stale = outbox.claim("lago", 10, now=now, lease_seconds=5)
    assert flush(now=now + timedelta(seconds=6)).delivered == 3
    assert outbox.mark_retry(stale.ids, stale.token, now, "late failure") == (0, 0)
    assert outbox.release(stale.ids, stale.token, now) == 0
    assert states() == {"delivered": 3}


def test_parallel_flushes_never_send_a_fact_twice(lago_settings, org):
    expected = record_many(120)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work() -> None:
        try:
            start.wait()
            flush()
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert set(lago_settings.sent_counts().values()) == {1}  # each fact was sent by one flush only
    assert_exactly_once(lago_settings, expected)


def test_max_attempts_dead_letters_a_fact_that_keeps_failing_and_resend_recovers_it(lago_settings, org, settings):
    settings.METERING = {**settings.METERING, "SINK_MAX_ATTEMPTS": 2}
    expected = record_many(3)
    lago_settings.fail("500", times=2)
    flush()
    report = flush(now=timezone.now() + timedelta(seconds=5))
    assert report.dead == 3
    assert all(
        error.startswith("gave up after 2 attempts: 500")
        for error in UsageOutbox.objects.values_list("last_error", flat=True)
    )
    outbox.resend(UsageOutbox.objects.all())
    assert flush().delivered == 3
    assert_exactly_once(lago_settings, expected)


def test_a_429_waits_at_least_as_long_as_lago_asks(lago_settings, org):
    record_many(2)
    lago_settings.fail("429", reset="40")
    before = timezone.now()
    report = flush()
    assert report.retry_in is not None and report.retry_in >= 40
    first_due = UsageOutbox.objects.aggregate(first=Min("next_attempt_at"))["first"]
    assert first_due >= before + timedelta(seconds=40)
    assert flush(now=before + timedelta(seconds=30)).requests == 0
    assert flush(now=before + timedelta(seconds=41)).delivered == 2


def test_retry_hints_and_backoff(settings):
    assert retry_after({"Retry-After": "12"}) == 12
    assert retry_after({"X-RateLimit-Reset": "3"}) == 3
    assert retry_after({"Retry-After": "2", "X-RateLimit-Reset": "9"}) == 9  # the longer wait wins
    assert retry_after({"X-RateLimit-Reset": "1000000100"}, now=1_000_000_000) == 100  # a Unix time
    assert retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412470) == 20
    assert retry_after({"Retry-After": "soon"}) is None
    assert retry_after({}) is None
    assert retry_after({"Retry-After": "999999"}) == 3600  # capped
    settings.METERING = {"SINK_RETRY_BASE_SECONDS": 1, "SINK_RETRY_MAX_SECONDS": 300}
    for attempts, low, high in [(1, 0.5, 1), (2, 1, 2), (5, 8, 16), (30, 150, 300), (10_000, 150, 300)]:
        delays = [backoff(attempts) for _ in range(50)]
        assert all(low <= delay <= high for delay in delays), (attempts, min(delays), max(delays))
        assert len(set(delays)) > 1  # jittered
    assert backoff(1, hint=30) == 30


def test_no_secret_ever_reaches_the_logs_or_the_database(lago_settings, org, settings, caplog):
    caplog.set_level("DEBUG")
    settings.METERING = {**settings.METERING, "SINK_URL": lago_settings.url.replace("http://", "http://user:pw@")}
    record_many(4)
    record("key1", 1, transaction_id="bad", feature=REFUSED)
    lago_settings.fail("500")
    flush()
    drain()
    lago_settings.keys = {}
    record_many(2, prefix="after")
    flush()
    state = SinkState.objects.get()
    stored_text = " ".join(
        [*UsageOutbox.objects.values_list("last_error", flat=True), state.last_error, state.blocked_reason]
    )
    for text in (caplog.text, stored_text):
        assert API_KEY not in text
        assert "pw@" not in text
    assert "***@127.0.0.1" in caplog.text  # the URL is shown, its credentials are not


def test_an_incomplete_configuration_claims_nothing(lago_settings, org, settings):
    record_many(3)
    settings.METERING = {**settings.METERING, "API_KEY": None}
    report = flush()
    assert report.blocked == "METERING['API_KEY'] is not set: the lago sink needs it"
    assert set(UsageOutbox.objects.values_list("state", "attempts", "claim_token")) == {("pending", 0, "")}
    assert lago_settings.requests == []


def test_the_tasks_flush_in_bounded_steps_and_the_sweep_releases_held_facts(lago_settings, org, settings):
    from metering.tasks import flush_outbox, sweep_outbox
    from tenants.models import Tenant

    settings.METERING = {**settings.METERING, "FLUSH_MAX_BATCHES": 2}
    record("other", 1, transaction_id="held")
    expected = record_many(35)
    first = flush_outbox.apply(args=("lago",)).get()  # run here, whatever the broker
    assert (first["batches"], first["delivered"], first["held"], first["more"]) == (2, 19, 1, True)
    Tenant.objects.filter(external_id="other").update(lago_subscription_id="sub-other")
    swept = sweep_outbox.apply().get()
    assert (swept["released"], swept["delivered"], swept["more"]) == (1, 17, False)
    assert lago_settings.stored_transaction_ids() == dict.fromkeys([*expected, "other/held"], 1)
