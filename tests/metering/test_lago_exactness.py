"""A delivered fact is a fact Lago holds (issue 12), against the fake Lago in both store modes, on both databases:
no two events of one request share a transaction_id, "already exists" is checked against the event Lago holds,
resends are byte-identical whatever the settings became, errors are read per index, and a fact that makes Lago
fail is isolated without holding up the others or being confused with a lost connection."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from io import StringIO

import httpx
import pytest
from django.core.management import call_command
from django.db.models import Min
from django.utils import timezone

from metering.delivery.deliver import flush
from metering.models import UsageOutbox
from tenants.models import Tenant
from tests.lago_server import FakeLago
from tests.lago_support import API_KEY, REFUSAL, REFUSED, lago_metering, record, record_many, states

pytest_plugins = ["tests.lago_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["postgres", "clickhouse"])
def store(request, settings, private_queue):
    with FakeLago(API_KEY, dedupe=request.param, refuse_codes={REFUSED: "undefined variable 'x'"}) as server:
        settings.METERING = lago_metering(server.url, CELERY_QUEUE=private_queue)
        yield server


def configure(settings, **overrides) -> None:
    settings.METERING = {**settings.METERING, **overrides}


def drain(rounds: int = 60) -> datetime:
    """Flush until nothing is pending, moving the clock to each retry time instead of sleeping."""
    now = timezone.now()
    for _ in range(rounds):
        flush(now=now)
        due = UsageOutbox.objects.filter(state="pending").aggregate(first=Min("next_attempt_at"))["first"]
        if due is None:
            return now
        now = max(now, due) + timedelta(milliseconds=1)
    raise AssertionError(f"still pending after {rounds} rounds: {states()}")


def batch_posts(server: FakeLago) -> list:
    return [request for request in server.requests if request.path.endswith("/batch")]


def test_two_tenants_one_transaction_id_one_batch_unqualified_both_arrive(store, org, settings):
    configure(settings, LAGO_QUALIFY_TRANSACTION_ID=False)
    Tenant.objects.filter(external_id="other").update(lago_subscription_id="sub-other")
    record("key1", 5, transaction_id="req-y")
    record("other", 9, transaction_id="req-y")
    record("key2", 1, transaction_id="req-z")
    report = flush()
    assert report.batches == 1 and report.delivered == 3 and report.dead == 0
    held = sorted(
        (e["external_subscription_id"], e["transaction_id"], e["properties"]["quantity"]) for e in store.events()
    )
    assert held == [("sub-org", "req-y", 5), ("sub-org", "req-z", 1), ("sub-other", "req-y", 9)]
    # no request carried the shared id twice (lago-api v1.39 would refuse the second and roll the batch back)
    assert all(len(set(request.keys)) == len(request.keys) for request in batch_posts(store))
    assert states() == {"delivered": 3}


def test_already_exists_for_another_event_is_a_conflict_never_delivered(lago_settings, org, settings):
    configure(settings, LAGO_QUALIFY_TRANSACTION_ID=False)
    # something else sent Lago an event under this id on the same subscription, with another quantity
    other = {
        "transaction_id": "req-x",
        "external_subscription_id": "sub-org",
        "code": "llm_tokens",
        "timestamp": 1,
        "properties": {"quantity": 2},
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(lago_settings.url + "/api/v1/events/batch", json={"events": [other]}, headers=headers).is_success
    record("key1", 7, transaction_id="req-x")
    record_many(3)
    report = flush()
    assert (report.delivered, report.dead) == (3, 1)
    dead = UsageOutbox.objects.get(state="dead")
    assert dead.last_error.startswith("conflict: Lago holds transaction_id 'req-x' for another event")
    assert "properties" in dead.last_error
    assert lago_settings.stored_transaction_ids()["req-x"] == 1  # ours was never taken for it
    out = StringIO()
    call_command("metering_status", "--json", stdout=out)
    [status] = json.loads(out.getvalue())["sinks"]
    assert status["conflicts"] == 1
    assert any("1 conflicts" in alert for alert in status["alerts"])
    assert status["dead_samples"][0]["error"].startswith("conflict:")


def test_a_settings_change_between_a_lost_answer_and_its_resend_leaves_one_event(store, org, settings):
    expected = record_many(6)
    store.fail("drop_after_store")
    assert flush().retrying == 6  # stored, but we do not know
    configure(
        settings, LAGO_METRICS={"llm_tokens": {"code": "tokens_v2", "property": "n"}}, LAGO_QUALIFY_TRANSACTION_ID=False
    )
    drain()
    assert store.stored_transaction_ids() == dict.fromkeys(expected, 1)
    assert {event["code"] for event in store.events()} == {"llm_tokens"}
    assert states() == {"delivered": 6}
    # a new fact follows the new settings
    record("key1", 2, transaction_id="new")
    drain()
    [new] = [event for event in store.events() if event["code"] == "tokens_v2"]
    assert new["transaction_id"] == "new" and new["properties"] == {"n": 2}


def test_the_body_is_frozen_at_the_first_send_and_resent_unchanged(lago_settings, org, settings):
    record("key1", 3, transaction_id="a", metadata={"model": "m"})
    lago_settings.fail("500")
    flush()
    row = UsageOutbox.objects.get()
    frozen = row.body
    assert json.loads(frozen)["code"] == "llm_tokens" and json.loads(frozen)["transaction_id"] == "key1/a"
    configure(settings, LAGO_METRICS={"llm_tokens": {"code": "changed", "metadata": False}})
    drain()
    row.refresh_from_db()
    assert row.body == frozen and row.state == "delivered"
    [event] = lago_settings.events()
    assert json.dumps(event["properties"], separators=(",", ":")) == json.dumps(
        json.loads(frozen)["properties"], separators=(",", ":")
    )
    assert event["code"] == "llm_tokens"


def test_metadata_is_mapped_to_schema_valid_properties(lago_settings, org):
    metadata = {
        "seed": True,
        "off": False,
        "none": None,
        "obj": {"b": 1, "a": "é"},
        "list": [1, "x"],
        "f": 1.5,
        "s": "x",
    }
    record("key1", 4, transaction_id="m", metadata=metadata)
    flush()
    [event] = lago_settings.events()
    assert event["properties"] == {
        "seed": "true",
        "off": "false",
        "obj": '{"a":"é","b":1}',
        "list": '[1,"x"]',
        "f": 1.5,
        "s": "x",
        "quantity": 4,
    }
    assert all(isinstance(value, str | int | float) for value in event["properties"].values())


def test_a_string_error_is_read_per_index(lago_settings, org):
    expected = record_many(15)
    record("key1", 1, transaction_id="bad", feature=REFUSED)
    report = flush()
    assert (report.delivered, report.dead) == (15, 1)
    assert len(batch_posts(lago_settings)) == 3  # BATCH_SIZE 10: 10 ok, then 6 -> 422 naming index, then 5 ok
    assert UsageOutbox.objects.get(state="dead").last_error == f"422 {REFUSAL}"
    assert lago_settings.stored_transaction_ids() == dict.fromkeys(expected, 1)


def test_a_poison_fact_that_makes_lago_fail_is_isolated_and_the_others_delivered(settings, org, private_queue):
    with FakeLago(API_KEY, crash_on="poison") as server:
        settings.METERING = lago_metering(server.url, CELERY_QUEUE=private_queue, SINK_BISECT_AFTER=2)
        expected = record_many(9)
        record("key1", 1, transaction_id="poison", metadata={"poison": "yes"})
        now = timezone.now()
        for _ in range(40):
            flush(now=now)
            if states() == {"delivered": 9, "pending": 1}:
                break
            now += timedelta(seconds=5)
        assert states() == {"delivered": 9, "pending": 1}
        assert server.stored_transaction_ids() == dict.fromkeys(expected, 1)
        poison = UsageOutbox.objects.get(state="pending")
        assert poison.record.transaction_id == "poison" and poison.server_errors >= 2
        # it waits alone; with SINK_MAX_ATTEMPTS it is dead-lettered after that many genuine attempts
        configure(settings, SINK_MAX_ATTEMPTS=poison.attempts + 2)
        for _ in range(10):
            now += timedelta(seconds=5)
            flush(now=now)
        poison.refresh_from_db()
        assert poison.state == "dead" and poison.last_error.startswith("gave up after")
        assert states() == {"delivered": 9, "dead": 1}


@pytest.mark.parametrize("fault", ["drop_before_store", "drop_after_store", "slow"])
def test_lost_connections_never_split_a_batch_nor_dead_letter(lago_settings, org, settings, fault):
    configure(settings, SINK_BISECT_AFTER=1, SINK_TIMEOUT_SECONDS=0.3)
    expected = record_many(10)
    lago_settings.fail(fault, times=5, delay=1.0)
    drain()
    assert states() == {"delivered": 10}
    assert set(UsageOutbox.objects.values_list("server_errors", flat=True)) == {0}
    # every request carried the whole batch: nothing was bisected for a transport failure
    assert {len(request.keys) for request in batch_posts(lago_settings)} == {10}
    assert lago_settings.stored_transaction_ids() == dict.fromkeys(expected, 1)


def test_the_untried_rest_of_a_failed_claim_counts_no_attempt(lago_settings, org, settings):
    configure(settings, LAGO_QUALIFY_TRANSACTION_ID=False)
    Tenant.objects.filter(external_id="other").update(lago_subscription_id="sub-other")
    record("key1", 1, transaction_id="same")
    record("other", 1, transaction_id="same")  # a second request of the same claim
    lago_settings.fail("503")
    flush()
    attempts = dict(UsageOutbox.objects.values_list("record__tenant__external_id", "attempts"))
    assert attempts == {"key1": 1, "other": 0}
    drain()
    assert states() == {"delivered": 2}


def test_a_lost_answer_for_an_id_another_subscription_also_holds_is_confirmed_in_its_own(lago_settings, org, settings):
    # EventsController#show finds *an* event by transaction_id: here the other tenant's, on another subscription
    configure(settings, LAGO_QUALIFY_TRANSACTION_ID=False)
    Tenant.objects.filter(external_id="other").update(lago_subscription_id="sub-other")
    record("key1", 5, transaction_id="req-y")
    flush()
    record("other", 9, transaction_id="req-y")
    lago_settings.fail("drop_after_store")
    flush()
    drain()
    assert states() == {"delivered": 2}
    held = sorted((e["external_subscription_id"], e["properties"]["quantity"]) for e in lago_settings.events())
    assert held == [("sub-org", 5), ("sub-other", 9)]


def test_the_same_id_quantity_and_subscription_at_another_time_is_a_conflict(lago_settings, org, settings):
    # two facts of one subscription that share an unqualified id: Lago stores the first only
    configure(settings, LAGO_QUALIFY_TRANSACTION_ID=False)
    moment = timezone.now().replace(microsecond=0)
    record("key1", 5, transaction_id="req-q", timestamp=moment)
    flush()
    record("key2", 5, transaction_id="req-q", timestamp=moment + timedelta(seconds=1))
    flush()
    assert states() == {"delivered": 1, "dead": 1}
    dead = UsageOutbox.objects.get(state="dead")
    assert dead.record.tenant.external_id == "key2"
    assert dead.last_error.startswith("conflict:") and "timestamp" in dead.last_error
