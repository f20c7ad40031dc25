"""A sink is chosen by its adapter's ``sink_class`` dotted path: a project's own ``Sink`` works with nothing to
register, its outbox rows carry its short name, and a path that names no usable sink is a system-check error and a
named exception, with nothing written."""

from __future__ import annotations

import io
import json

import pytest
from django.core.checks import run_checks
from django.core.management import call_command

from metering.delivery.deliver import flush
from metering.delivery.sinks import SinkNotConfigured, get_sink
from metering.models import UsageOutbox, UsageRecord
from tests.custom_sink import CollectorSink
from tests.lago_support import record, webhook_metering

pytest_plugins = ["tests.lago_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


def test_a_projects_own_sink_class_delivers_by_path(settings, collector, private_queue, org):
    settings.METERING = webhook_metering(
        collector.url + "/ingest", ADAPTER="tests.custom_sink.CollectorAdapter", CELERY_QUEUE=private_queue
    )
    assert isinstance(get_sink(), CollectorSink)
    assert isinstance(get_sink("collector"), CollectorSink)
    with pytest.raises(SinkNotConfigured, match="not the configured one"):
        get_sink("webhook")
    record("key1", 2, transaction_id="t-1")
    record("key2", 3, transaction_id="t-2")
    assert set(UsageOutbox.objects.values_list("sink", flat=True)) == {"collector"}
    report = flush()
    assert (report.sink, report.delivered, report.dead) == ("collector", 2, 0)
    assert sorted(collector.store) == ["key1/t-1", "key2/t-2"]
    out = io.StringIO()
    call_command("metering_status", "--json", stdout=out)
    assert json.loads(out.getvalue())["configured_sink"] == "collector"
    assert not [message for message in run_checks() if message.id.startswith("xaas_metering.E")]


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ("MissingSinkAdapter", "cannot be imported"),
        ("NotASinkAdapter", "is not a subclass of metering.delivery.sinks.Sink"),
        ("NamelessSinkAdapter", "must set name"),
        ("LongNameSinkAdapter", "must set name"),
    ],
)
def test_a_sink_class_that_names_no_usable_sink_is_refused(settings, org, adapter, message):
    settings.METERING = webhook_metering("http://127.0.0.1:9/ingest", ADAPTER=f"tests.custom_sink.{adapter}")
    errors = [error for error in run_checks() if error.id == "xaas_metering.E050"]
    assert len(errors) == 1 and message in errors[0].msg
    with pytest.raises(SinkNotConfigured, match=message):
        get_sink()
    with pytest.raises(SinkNotConfigured, match=message):
        record("key1", 1, transaction_id="t-1")
    # The outbox row is written in the fact's transaction: without a sink, neither is written.
    assert (UsageRecord.objects.count(), UsageOutbox.objects.count()) == (0, 0)
