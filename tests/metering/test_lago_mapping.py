"""From a stored fact to a Lago event: selection by settings, the outbox row in the fact's transaction, and the
mapping (subscription inheritance, held facts, metric code and property, transaction id, timestamp, properties)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from django.core.checks import run_checks
from django.db import transaction

from metering import DuplicateUsageEvent, get_meter
from metering.adapters.lago import LagoMeteringAdapter
from metering.adapters.webhook import WebhookMeteringAdapter
from metering.delivery.deliver import facts_held, flush
from metering.delivery.outbox import release_held, status
from metering.delivery.sinks.lago import lago_timestamp, quantity_value
from metering.models import UsageOutbox, UsageRecord
from tenants.models import Tenant
from tests.factories import any_backdate
from tests.lago_support import lago_metering, record, states

pytest_plugins = ["tests.lago_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


def by_transaction(server):
    return {event["transaction_id"]: event for event in server.events()}


def test_the_adapter_is_selected_by_settings_alone(settings):
    settings.METERING = {"ADAPTER": "metering.adapters.lago.LagoMeteringAdapter"}
    assert isinstance(get_meter(), LagoMeteringAdapter)
    settings.METERING = {"ADAPTER": "metering.adapters.webhook.WebhookMeteringAdapter"}
    assert isinstance(get_meter(), WebhookMeteringAdapter)


def test_the_example_project_reads_the_adapter_from_the_environment():
    env = {
        **os.environ,
        "METERING_ADAPTER": "metering.adapters.lago.LagoMeteringAdapter",
        "METERING_SINK_URL": "http://127.0.0.1:3000",
        "METERING_API_KEY": "from-env",
        "METERING_BATCH_SIZE": "50",
        "DJANGO_SETTINGS_MODULE": "project.settings",
    }
    code = (
        "import django, json; django.setup(); from django.conf import settings; from metering import get_meter; "
        "print(json.dumps({**settings.METERING, 'meter': type(get_meter()).__name__}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert loaded["meter"] == "LagoMeteringAdapter"
    assert (loaded["SINK_URL"], loaded["API_KEY"], loaded["BATCH_SIZE"]) == ("http://127.0.0.1:3000", "from-env", 50)


def test_the_outbox_row_commits_and_rolls_back_with_the_fact(lago_settings, org):
    record("key1", 5, transaction_id="kept")
    with pytest.raises(RuntimeError), transaction.atomic():
        record("key1", 7, transaction_id="rolled-back")
        assert UsageOutbox.objects.filter(record__transaction_id="rolled-back").exists()
        raise RuntimeError("the caller's transaction fails after recording")
    with pytest.raises(DuplicateUsageEvent):
        record("key1", 5, transaction_id="kept")
    rows = list(UsageOutbox.objects.values_list("record__transaction_id", "sink", "state"))
    assert rows == [("kept", "lago", "pending")]
    assert UsageRecord.objects.count() == 1


def test_the_database_adapter_writes_no_outbox(settings, org):
    settings.METERING = {}
    record("key1", 1)
    assert UsageRecord.objects.count() == 1
    assert not UsageOutbox.objects.exists()


@any_backdate()
def test_event_fields_are_built_from_the_stored_fact(lago_settings, org, settings):
    settings.METERING = {
        **settings.METERING,
        "LAGO_METRICS": {"llm_tokens": {"code": "tokens_metric", "property": "tokens"}, "images": "image_count"},
    }
    moment = datetime(2026, 5, 1, 12, 0, 0, 123999, tzinfo=UTC)
    record("key1", 120, transaction_id="a", timestamp=moment, metadata={"model": "small", "tokens": 999})
    record("org", "0.25", transaction_id="b", timestamp=moment, feature="images")
    record("proj", "2.5", transaction_id="c", timestamp=moment, feature="embeddings", metadata={"n": 3})
    report = flush()
    assert (report.delivered, report.requests) == (3, 1)
    events = by_transaction(lago_settings)
    assert events["key1/a"] | {"lago_id": None} == {
        "lago_id": None,
        "transaction_id": "key1/a",
        "lago_customer_id": None,
        "code": "tokens_metric",
        "timestamp": "1777636800.123",  # milliseconds, truncated: never rounded into the next millisecond
        "precise_total_amount_cents": None,
        # the quantity wins over a metadata key of the same name
        "properties": {"model": "small", "tokens": 120},
        "lago_subscription_id": None,
        "external_subscription_id": "sub-org",
    }
    assert events["org/b"]["code"] == "image_count"
    assert events["org/b"]["properties"] == {"quantity": "0.25"}  # exact decimal string, never a float
    assert events["proj/c"]["code"] == "embeddings"
    assert events["proj/c"]["properties"] == {"n": 3, "quantity": "2.5"}


def test_timestamp_and_quantity_formats_are_exact():
    assert lago_timestamp(datetime(1970, 1, 1, tzinfo=UTC)) == "0.000"
    assert lago_timestamp(datetime(2022, 4, 29, 14, 39, 51, 123456, tzinfo=UTC)) == "1651243191.123"
    assert lago_timestamp(datetime(2022, 4, 29, 14, 39, 51, 999, tzinfo=UTC)) == "1651243191.000"
    assert quantity_value(120_000_000) == 120
    assert quantity_value(1) == "0.000001"
    assert quantity_value(10**18) == 10**12


def test_metadata_policy_per_metric(lago_settings, org, settings):
    settings.METERING = {
        **settings.METERING,
        "LAGO_QUANTITY_PROPERTY": "units",
        "LAGO_METRICS": {"llm_tokens": {"metadata": ["model"]}, "images": {"code": "img", "metadata": False}},
    }
    record("key1", 3, transaction_id="a", metadata={"model": "m", "secret_prompt": "x"})
    record("key1", 4, transaction_id="b", feature="images", metadata={"model": "m"})
    flush()
    events = by_transaction(lago_settings)
    assert events["key1/a"]["properties"] == {"model": "m", "units": 3}
    assert events["key1/b"]["properties"] == {"units": 4}


def test_transaction_ids_are_qualified_so_tenants_sharing_a_subscription_never_collide(lago_settings, org):
    # key1 and key2 bill to the same subscription (inherited from org) and both used transaction id "same"
    record("key1", 1, transaction_id="same")
    record("key2", 2, transaction_id="same")
    assert flush().delivered == 2
    assert sorted(by_transaction(lago_settings)) == ["key1/same", "key2/same"]


def test_unqualified_transaction_ids_when_asked(lago_settings, org, settings):
    settings.METERING = {**settings.METERING, "LAGO_QUALIFY_TRANSACTION_ID": False}
    record("key1", 1, transaction_id="plain-key")
    flush()
    assert list(by_transaction(lago_settings)) == ["plain-key"]


def test_a_generated_transaction_id_is_the_stored_one(lago_settings, org):
    record("key1", 1)
    flush()
    stored = UsageRecord.objects.get().transaction_id
    assert list(by_transaction(lago_settings)) == [f"key1/{stored}"]


def test_the_subscription_is_inherited_from_the_nearest_ancestor(lago_settings, org):
    Tenant.objects.filter(external_id="proj").update(lago_subscription_id="sub-proj")
    Tenant.objects.filter(external_id="key2").update(lago_subscription_id="sub-key2")
    for tenant_id in ("org", "proj", "key1", "key2"):
        record(tenant_id, 1, transaction_id="t")
    flush()
    subscriptions = {tx: event["external_subscription_id"] for tx, event in by_transaction(lago_settings).items()}
    assert subscriptions == {"org/t": "sub-org", "proj/t": "sub-proj", "key1/t": "sub-proj", "key2/t": "sub-key2"}


def test_without_any_subscription_a_fact_is_held_reported_then_released(lago_settings, org, caplog):
    held_signals = []

    def on_held(sender, signal, **kwargs):
        held_signals.append(kwargs)

    facts_held.connect(on_held)
    try:
        record("other", 2, transaction_id="h1")
        record("key1", 1, transaction_id="k1")
        report = flush()
    finally:
        facts_held.disconnect(on_held)
    assert (report.delivered, report.held) == (1, 1)
    assert list(by_transaction(lago_settings)) == ["key1/k1"]
    assert held_signals == [{"sink": "lago", "tenant_ids": ["other"], "count": 1}]
    assert "no Lago subscription" in caplog.text and "other" in caplog.text
    current = status("lago")
    assert current.counts["held"] == 1 and current.held_tenants == ["other"]
    assert any("held" in alert for alert in current.alerts)
    # held, not dropped: nothing is sent until a subscription exists, then it is
    assert release_held("lago") == 0
    assert flush().requests == 0
    Tenant.objects.filter(external_id="other").update(lago_subscription_id="sub-other")
    assert release_held("lago") == 1
    assert flush().delivered == 1
    assert by_transaction(lago_settings)["other/h1"]["external_subscription_id"] == "sub-other"
    assert states() == {"delivered": 2}


def test_the_subscription_is_frozen_at_the_first_attempt(lago_settings, org):
    record("key1", 1, transaction_id="f")
    lago_settings.fail("500")
    assert flush().retrying == 1
    assert UsageOutbox.objects.get().external_subscription_id == "sub-org"
    # the tenant moves to another subscription between the attempts: the resend still bills the first one,
    # which may already hold the event (the 500 could have come after storing it)
    Tenant.objects.filter(external_id="org").update(lago_subscription_id="sub-changed")
    assert flush(now=datetime.now(UTC) + timedelta(seconds=5)).delivered == 1
    assert by_transaction(lago_settings)["key1/f"]["external_subscription_id"] == "sub-org"


def test_delivery_settings_are_checked(settings):
    def ids():
        return {message.id for message in run_checks() if message.id and message.id.startswith("xaas_metering")}

    settings.METERING = {"ADAPTER": "metering.adapters.lago.LagoMeteringAdapter"}
    assert ids() == {"xaas_metering.E010", "xaas_metering.E011"}
    settings.METERING = {**lago_metering("http://127.0.0.1:1"), "BATCH_SIZE": 150}
    assert ids() == {"xaas_metering.W010"}
    settings.METERING = {
        **lago_metering("http://127.0.0.1:1"),
        "LAGO_METRICS": {"llm_tokens": {"code": "x", "typo": 1}},
        "LAGO_QUANTITY_PROPERTY": "",
        "SINK_TIMEOUT_SECONDS": 0,
        "SINK_MAX_ATTEMPTS": 0,
        "CELERY_QUEUE": 5,
    }
    assert ids() == {
        "xaas_metering.E012",
        "xaas_metering.E013",
        "xaas_metering.E014",
        "xaas_metering.E016",
        "xaas_metering.E017",
    }
    settings.METERING = {**lago_metering("http://127.0.0.1:1"), "SINK_TIMEOUT_SECONDS": 30}
    assert ids() == {"xaas_metering.E015"}  # the lease would end while a request may still be in flight
    settings.METERING = {"ADAPTER": "metering.adapters.webhook.WebhookMeteringAdapter", "SINK_URL": "http://x"}
    assert ids() == {"xaas_metering.E011"}


def test_quota_enforced_and_async_recording_queue_their_facts_too(lago_settings, org):
    from asgiref.sync import async_to_sync

    from metering import UsageEvent
    from quotas.exceptions import QuotaExceeded
    from quotas.handler import QuotaPolicyHandler
    from quotas.models import QuotaLimit

    QuotaLimit.objects.create(tenant=org["org"], feature="llm_tokens", limit=10, period="month")
    handler = QuotaPolicyHandler("key1")
    handler.consume("llm_tokens", 4, transaction_id="within-quota")
    with pytest.raises(QuotaExceeded):
        handler.consume("llm_tokens", 7, transaction_id="over-quota")  # refused: stored nowhere, sent nowhere
    async_to_sync(get_meter().record_usage)(UsageEvent("key2", "llm_tokens", 1, transaction_id="async"))
    assert flush().delivered == 2
    assert sorted(by_transaction(lago_settings)) == ["key1/within-quota", "key2/async"]
