"""Several sinks at once (METERING["SINKS"]): Lago (a fake on 127.0.0.1) and a real ClickHouse receive the same
facts, each sink with its own outbox rows, state, retries and lag; a sink added later back-fills."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db.models import Min
from django.utils import timezone

from metering.delivery.deliver import flush
from metering.delivery.reconcile import reconcile_clickhouse
from metering.models import UsageOutbox
from tests.clickhouse_server import FaultyProxy
from tests.lago_support import API_KEY, record_many

pytest_plugins = ["tests.clickhouse_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)

LAGO = "metering.delivery.sinks.lago.LagoSink"
CLICKHOUSE = "metering.delivery.sinks.clickhouse.ClickHouseSink"


@pytest.fixture
def both(settings, clickhouse, lago):
    settings.METERING = {
        **settings.METERING,
        "ADAPTER": "metering.adapters.lago.LagoMeteringAdapter",
        "SINK_URL": lago.url,
        "API_KEY": API_KEY,
        "SINKS": [LAGO, CLICKHOUSE],
        "CLICKHOUSE_BATCH_SIZE": 1000,
    }
    return lago


def by_sink() -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for sink, state in UsageOutbox.objects.values_list("sink", "state"):
        counts.setdefault(sink, {}).setdefault(state, 0)
        counts[sink][state] += 1
    return counts


def drain(sink: str, rounds: int = 40) -> None:
    now = timezone.now()
    for _ in range(rounds):
        assert flush(sink, now=now).blocked is None
        due = UsageOutbox.objects.filter(sink=sink, state="pending").aggregate(first=Min("next_attempt_at"))["first"]
        if due is None:
            return
        now = max(now, due) + timedelta(milliseconds=1)
    raise AssertionError(by_sink())


def test_lago_and_clickhouse_receive_the_same_facts_independently(both, clickhouse, clickhouse_db, settings):
    with FaultyProxy(clickhouse.url) as proxy:
        settings.METERING = {**settings.METERING, "CLICKHOUSE_URL": proxy.url}
        expected = record_many(25)
        assert by_sink() == {"lago": {"pending": 25}, "clickhouse": {"pending": 25}}
        proxy.faults = ["503-before"]
        report = flush("clickhouse")
        assert report.retrying == 25 and report.delivered == 0  # ClickHouse is down ...
        drain("lago")  # ... Lago is not held back by it
        assert by_sink() == {"lago": {"delivered": 25}, "clickhouse": {"pending": 25}}
        status = StringIO()
        call_command("metering_status", "--json", stdout=status)
        payload = json.loads(status.getvalue())
        assert payload["configured_sinks"] == ["lago", "clickhouse"]
        sinks = {entry["sink"]: entry for entry in payload["sinks"]}
        assert sinks["clickhouse"]["counts"]["pending"] == 25 and sinks["clickhouse"]["last_error"].startswith("503")
        assert sinks["lago"]["counts"]["delivered"] == 25 and sinks["lago"]["counts"]["pending"] == 0
        text = StringIO()
        call_command("metering_status", stdout=text)
        assert "configured sinks: lago, clickhouse" in text.getvalue()
        assert "not configured" not in text.getvalue()
        drain("clickhouse")
    assert by_sink() == {"lago": {"delivered": 25}, "clickhouse": {"delivered": 25}}
    assert sorted(both.stored_transaction_ids()) == sorted(expected)
    assert set(both.stored_transaction_ids().values()) == {1}
    stored = clickhouse.query(
        f"SELECT concat(tenant_id, '/', transaction_id) FROM {clickhouse_db}.usage_facts FINAL FORMAT TSV"
    )
    assert sorted(stored.split()) == sorted(expected)
    assert reconcile_clickhouse() == []


def test_a_sink_added_later_backfills_from_the_facts(both, clickhouse, clickhouse_db, settings):
    settings.METERING = {**settings.METERING, "SINKS": [LAGO]}
    record_many(12, prefix="old")
    assert by_sink() == {"lago": {"pending": 12}}
    settings.METERING = {**settings.METERING, "SINKS": [LAGO, CLICKHOUSE]}
    record_many(3, prefix="new")
    assert by_sink() == {"lago": {"pending": 15}, "clickhouse": {"pending": 3}}
    out = StringIO()
    call_command("metering_flush", "--sink", "clickhouse", "--backfill", "--no-progress", stdout=out)
    assert "12 facts queued by the backfill" in out.getvalue()
    assert by_sink()["clickhouse"] == {"delivered": 15}
    out = StringIO()
    call_command("metering_flush", "--sink", "clickhouse", "--backfill", "--no-progress", stdout=out)
    assert "0 facts queued by the backfill" in out.getvalue()  # idempotent: one row per fact and sink
    assert UsageOutbox.objects.filter(sink="clickhouse").count() == 15
    assert clickhouse.query(f"SELECT count() FROM {clickhouse_db}.usage_facts FINAL").strip() == "15"
    assert reconcile_clickhouse() == []
    assert by_sink()["lago"] == {"pending": 15}  # untouched by the other sink's flush


def test_an_unconfigured_sink_cannot_be_flushed(both):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="not the configured one"):
        call_command("metering_flush", "--sink", "webhook", stdout=StringIO())
