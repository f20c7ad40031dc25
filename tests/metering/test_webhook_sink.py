"""The generic webhook sink: signed JSON batches, the same outbox guarantees as Lago, against a real HTTP receiver
that checks the HMAC over the raw body and stores each idempotency key once."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest
from django.db.models import Min
from django.utils import timezone

from metering.delivery.deliver import flush
from metering.delivery.outbox import resend
from metering.delivery.sinks.webhook import signature
from metering.models import SinkState, UsageOutbox
from tests.factories import any_backdate
from tests.lago_support import WEBHOOK_SECRET, record, record_many, states, webhook_metering

pytest_plugins = ["tests.lago_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def hook(settings, collector, private_queue, org):
    settings.METERING = webhook_metering(collector.url + "/ingest", CELERY_QUEUE=private_queue)
    return collector


def drain(rounds: int = 30) -> None:
    now = timezone.now()
    for _ in range(rounds):
        report = flush(now=now)
        assert report.blocked is None, report.blocked
        due = UsageOutbox.objects.filter(state="pending").aggregate(first=Min("next_attempt_at"))["first"]
        if due is None:
            return
        now = max(now, due) + timedelta(milliseconds=1)
    raise AssertionError(states())


def test_the_signature_is_hmac_sha256_of_the_raw_body():
    body = b'{"events":[]}'
    expected = hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert signature(WEBHOOK_SECRET, body) == f"sha256={expected}"
    assert signature(WEBHOOK_SECRET, body + b" ") != signature(WEBHOOK_SECRET, body)


@any_backdate()
def test_facts_arrive_signed_in_the_documented_format(hook):
    moment = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    record("key1", "120.5", transaction_id="t-1", timestamp=moment, metadata={"model": "m"})
    report = flush()
    assert (report.delivered, report.requests) == (1, 1)
    assert hook.store == {
        "key1/t-1": {
            "idempotency_key": "key1/t-1",
            "tenant_id": "key1",
            "transaction_id": "t-1",
            "feature": "llm_tokens",
            "quantity": "120.5",
            "units": 120_500_000,
            "timestamp": "2026-05-01T12:00:00.123456Z",
            "metadata": {"model": "m"},
        }
    }


def test_no_subscription_is_needed(hook):
    record("other", 1, transaction_id="x")  # "other" has no Lago subscription: irrelevant to a webhook
    assert flush().delivered == 1


@pytest.mark.parametrize(
    ("fault", "params"),
    [
        ("500", {}),
        ("429", {"retry_after": "1"}),
        ("slow", {"delay": 1.5}),
        ("drop_before_store", {}),
        ("drop_after_store", {}),
    ],
)
def test_every_committed_fact_is_stored_once_under_failures(hook, fault, params):
    hook.fail(fault, times=2, **params)
    expected = record_many(25)
    drain()
    assert hook.stored_keys() == dict.fromkeys(expected, 1)
    assert states() == {"delivered": 25}
    if fault == "drop_after_store":
        # the receiver got batches twice and kept them once: the idempotency key is stable across resends
        assert sum(hook.repeats.values()) > 0


def test_a_wrong_secret_blocks_delivery_until_the_right_one_is_configured(hook, settings):
    settings.METERING = {**settings.METERING, "WEBHOOK_SECRET": "not-the-receivers-secret"}
    expected = record_many(5)
    assert flush().blocked.startswith("401")
    assert flush().requests == 0
    assert SinkState.objects.get(sink="webhook").blocked_status == 401
    settings.METERING = {**settings.METERING, "WEBHOOK_SECRET": WEBHOOK_SECRET}
    assert flush().delivered == 5
    assert hook.stored_keys() == dict.fromkeys(expected, 1)


def test_refused_events_are_dead_lettered_the_rest_delivered_and_resendable(hook):
    expected = record_many(6)
    record("key2", 1, transaction_id="refused", metadata={"reject": "yes"})
    report = flush()
    assert (report.delivered, report.dead, report.requests) == (6, 1, 2)
    dead = UsageOutbox.objects.get(state="dead")
    assert dead.last_error == "422 \"metadata 'reject' refused\""
    hook.reject_metadata_key = "nothing-is-refused-now"  # fixed on the receiver's side
    assert resend(UsageOutbox.objects.all()) == 1
    assert flush().delivered == 1
    assert hook.stored_keys() == dict.fromkeys([*expected, "key2/refused"], 1)


def test_credentials_in_the_url_become_basic_auth_and_stay_out_of_logs(hook, settings, caplog):
    caplog.set_level("DEBUG")
    seen = []
    original = hook.process

    def spy(method, path, headers, body):
        seen.append(headers.get("Authorization"))
        return original(method, path, headers, body)

    hook.process = spy
    settings.METERING = {
        **settings.METERING,
        "SINK_URL": hook.url.replace("http://", "http://ingest:s3cr3t@") + "/ingest",
    }
    record_many(2)
    assert flush().delivered == 2
    assert seen == ["Basic aW5nZXN0OnMzY3IzdA=="]  # base64("ingest:s3cr3t")
    assert "s3cr3t" not in caplog.text and WEBHOOK_SECRET not in caplog.text
