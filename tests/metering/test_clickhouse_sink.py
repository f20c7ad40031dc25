"""The ClickHouse sink against a real ``clickhouse-server`` (Debian's 18.16) that the session starts itself:
rows, lineage, schema management, blocking statuses, reconciliation, and exactly once in effect through lost
answers, 5xx after the insert and a worker that died before marking its batch."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.db.models import Min
from django.utils import timezone

from metering.checks import check_delivery_settings
from metering.delivery import outbox
from metering.delivery.deliver import flush
from metering.delivery.reconcile import reconcile_clickhouse
from metering.delivery.sinks.clickhouse import COLUMNS, ClickHouseSink, ensure_schema
from metering.models import SinkState, UsageOutbox
from tests.clickhouse_server import FaultyProxy
from tests.clickhouse_support import clickhouse_metering
from tests.factories import any_backdate
from tests.faults import TcpProxy
from tests.lago_support import (
    CeleryWorker,
    delete_queue,
    record,
    record_many,
    require_worker_services,
    states,
    wait_until,
)

pytest_plugins = ["tests.clickhouse_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


def drain(rounds: int = 40) -> None:
    now = timezone.now()
    for _ in range(rounds):
        report = flush(now=now)
        assert report.blocked is None, report.blocked
        due = UsageOutbox.objects.filter(state="pending").aggregate(first=Min("next_attempt_at"))["first"]
        if due is None:
            return
        now = max(now, due) + timedelta(milliseconds=1)
    raise AssertionError(states())


def rows(server, database: str, where: str = "1") -> list[dict]:
    text = server.query(
        f"SELECT * FROM {database}.usage_facts FINAL WHERE {where} "
        "ORDER BY tenant_id, transaction_id FORMAT JSONEachRow"
    )
    return [json.loads(line) for line in text.splitlines() if line]


def scalar(server, sql: str) -> str:
    return server.query(sql).strip()


@any_backdate()
def test_facts_arrive_with_their_lineage_exact_units_and_quantity(clickhouse, clickhouse_db):
    moment = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    record("key1", "120.5", transaction_id="t-1", timestamp=moment, metadata={"model": 'm\t"\u00e9\U0001f600'})
    record("proj", "1000000000000", transaction_id="t-2", timestamp=moment)  # MAX_QUANTITY: 10**18 units
    report = flush()
    assert (report.delivered, report.requests) == (2, 1)
    got = rows(clickhouse, clickhouse_db)
    assert got == [
        {
            "tenant_id": "key1",
            "feature": "llm_tokens",
            "timestamp": "2026-05-01 12:00:00",
            "microsecond": 123456,
            "transaction_id": "t-1",
            "units": "120500000",
            "quantity": "120.5",
            "lineage": ["org", "proj", "key1"],
            "metadata": '{"model":"m\\t\\"é😀"}',
        },
        {
            "tenant_id": "proj",
            "feature": "llm_tokens",
            "timestamp": "2026-05-01 12:00:00",
            "microsecond": 123456,
            "transaction_id": "t-2",
            "units": "1000000000000000000",
            "quantity": "1000000000000",
            "lineage": ["org", "proj"],
            "metadata": "{}",
        },
    ]
    subtree = f"SELECT toString(sum(toDecimal128(units, 0))) FROM {clickhouse_db}.usage_facts FINAL"
    assert scalar(clickhouse, subtree + " WHERE has(lineage, 'org')") == "1000000000120500000"
    assert scalar(clickhouse, subtree + " WHERE has(lineage, 'key1')") == "120500000"


def test_large_batches_go_in_one_insert_each(clickhouse, clickhouse_db, settings):
    settings.METERING = {**settings.METERING, "CLICKHOUSE_BATCH_SIZE": 500, "BATCH_SIZE": 7}
    record_many(1200)
    report = flush()
    assert (report.delivered, report.batches, report.requests) == (1200, 3, 3)  # CLICKHOUSE_BATCH_SIZE, not BATCH_SIZE
    assert scalar(clickhouse, f"SELECT count() FROM {clickhouse_db}.usage_facts FINAL") == "1200"
    assert reconcile_clickhouse() == []


def test_exactly_once_through_lost_answers_5xx_and_a_dead_worker(clickhouse, clickhouse_db, settings):
    with FaultyProxy(clickhouse.url) as proxy:
        settings.METERING = {**settings.METERING, "CLICKHOUSE_URL": proxy.url}
        expected = record_many(60)
        # A worker claims a batch, inserts it, and dies before marking it: the lease runs out, another resends.
        sink = ClickHouseSink()
        claimed = outbox.claim("clickhouse", 10, now=timezone.now(), lease_seconds=15)
        sink.prepare(claimed.facts)
        assert sink.send([sink.build(fact) for fact in claimed.facts]).outcome.value == "ok"
        # Then: an answer lost after the insert, a 502 after the insert, a 503 before it, each on a fresh batch.
        proxy.faults = ["drop", "502", "503-before", "drop"]
        now = timezone.now() + timedelta(seconds=16)  # past the dead worker's lease
        for _ in range(40):
            report = flush(now=now)
            assert report.blocked is None
            due = UsageOutbox.objects.filter(state="pending").aggregate(first=Min("next_attempt_at"))["first"]
            if due is None:
                break
            now = max(now, due) + timedelta(milliseconds=1)
        assert states() == {"delivered": 60}
        assert proxy.forwarded >= 60 // 10 + 4  # the dead worker's batch and three lost answers were sent again
    table = f"{clickhouse_db}.usage_facts"
    stored = {f"{r['tenant_id']}/{r['transaction_id']}" for r in rows(clickhouse, clickhouse_db)}
    assert stored == set(expected)
    assert scalar(clickhouse, f"SELECT count() FROM {table} FINAL") == "60"
    expected_units = sum((index + 1) * 250_000 for index in range(60))  # record_many: quantity (index + 1) / 4
    assert scalar(clickhouse, f"SELECT sum(units) FROM {table} FINAL") == str(expected_units)
    assert reconcile_clickhouse() == []
    clickhouse.query(f"OPTIMIZE TABLE {table} FINAL")  # merges drop the duplicates for good
    assert scalar(clickhouse, f"SELECT count() FROM {table}") == "60"


def test_duplicates_exist_without_final_and_final_hides_them(clickhouse, clickhouse_db):
    """The mechanism itself: the same batch inserted twice is two parts until merged; FINAL counts it once."""
    record_many(5)
    table = f"{clickhouse_db}.usage_facts"
    clickhouse.query(f"SYSTEM STOP MERGES {table}")  # a background merge would hide the copy we look for
    sink = ClickHouseSink()
    claimed = outbox.claim("clickhouse", 10, now=timezone.now(), lease_seconds=15)
    events = [sink.build(fact) for fact in claimed.facts]
    assert sink.send(events).outcome.value == "ok"
    assert sink.send(events).outcome.value == "ok"
    assert scalar(clickhouse, f"SELECT count() FROM {table}") == "10"
    assert scalar(clickhouse, f"SELECT count() FROM {table} FINAL") == "5"


def test_wrong_password_blocks_delivery_and_nothing_is_lost(clickhouse, clickhouse_db, settings):
    settings.METERING = {**settings.METERING, "CLICKHOUSE_PASSWORD": "wrong-password-xyz"}
    record_many(3)
    report = flush()
    assert report.blocked and "193" in report.blocked
    assert "wrong-password-xyz" not in report.blocked
    assert states() == {"pending": 3}
    assert SinkState.objects.get(sink="clickhouse").blocked_status == 401
    settings.METERING = {**settings.METERING, "CLICKHOUSE_PASSWORD": clickhouse_metering_password()}
    drain()  # a changed credential lifts the block by itself
    assert scalar(clickhouse, f"SELECT count() FROM {clickhouse_db}.usage_facts FINAL") == "3"


def clickhouse_metering_password() -> str:
    from tests.clickhouse_server import PASSWORD

    return PASSWORD


def test_a_missing_table_blocks_instead_of_burning_retries(clickhouse, clickhouse_db, settings):
    settings.METERING = {**settings.METERING, "CLICKHOUSE_TABLE": "nope"}
    record_many(2)
    report = flush()
    assert report.blocked and "60" in report.blocked
    assert states() == {"pending": 2}


def test_schema_command_is_idempotent_and_adds_missing_columns(clickhouse, clickhouse_db, settings):
    out = StringIO()
    call_command("clickhouse_schema", stdout=out)
    assert "up to date" in out.getvalue()
    settings.METERING = {**settings.METERING, "CLICKHOUSE_TABLE": "older"}
    without_metadata = ", ".join(f"{name} {kind}" for name, kind in COLUMNS if name != "metadata")
    clickhouse.query(
        f"CREATE TABLE {clickhouse_db}.older ({without_metadata}) ENGINE = ReplacingMergeTree() "
        "PARTITION BY toYYYYMM(timestamp) ORDER BY (tenant_id, feature, timestamp, transaction_id)"
    )
    out = StringIO()
    call_command("clickhouse_schema", stdout=out)
    assert "added column metadata String" in out.getvalue()
    out = StringIO()
    call_command("clickhouse_schema", stdout=out)
    assert "up to date" in out.getvalue()
    engine = scalar(
        clickhouse,
        f"SELECT engine_full FROM system.tables WHERE database = '{clickhouse_db}' AND name = 'usage_facts'",
    )
    assert "ReplacingMergeTree" in engine and "toYYYYMM(timestamp)" in engine


def test_schema_command_refuses_a_table_that_would_count_twice(clickhouse, clickhouse_db, settings):
    from django.core.management.base import CommandError

    settings.METERING = {**settings.METERING, "CLICKHOUSE_TABLE": "plain"}
    clickhouse.query(f"CREATE TABLE {clickhouse_db}.plain (tenant_id String) ENGINE = Log")
    with pytest.raises(CommandError, match="not ReplacingMergeTree"):
        call_command("clickhouse_schema", stdout=StringIO())


@any_backdate()
def test_reconcile_reports_every_difference_and_exits_1(clickhouse, clickhouse_db):
    day = datetime(2026, 4, 30, 23, 59, 59, tzinfo=UTC)
    record("key1", "2.5", transaction_id="a", timestamp=day)
    drain()
    record("key2", Decimal("0.000001"), transaction_id="b", timestamp=day)  # not delivered yet
    out = StringIO()
    with pytest.raises(SystemExit) as exit_:
        call_command("reconcile_usage", "--sink", "clickhouse", stdout=out)
    assert exit_.value.code == 1
    assert "key2 llm_tokens 2026-04-30: facts 0.000001 (1 events), clickhouse 0 (0 events)" in out.getvalue()
    assert "1 differences" in out.getvalue()
    drain()
    out = StringIO()
    call_command("reconcile_usage", "--sink", "clickhouse", stdout=out)
    assert "0 differences" in out.getvalue()


def test_system_checks_name_the_clickhouse_settings(settings):
    settings.METERING = {"ADAPTER": "metering.adapters.clickhouse.ClickHouseMeteringAdapter"}
    ids = {message.id for message in check_delivery_settings()}
    assert "xaas_metering.E060" in ids and "xaas_metering.E010" not in ids and "xaas_metering.E011" not in ids
    settings.METERING = {
        "ADAPTER": "metering.adapters.clickhouse.ClickHouseMeteringAdapter",
        "CLICKHOUSE_URL": "ftp://x",
        "CLICKHOUSE_TABLE": "facts; DROP TABLE x",
        "CLICKHOUSE_BATCH_SIZE": 0,
    }
    ids = {message.id for message in check_delivery_settings()}
    assert {"xaas_metering.E061", "xaas_metering.E062", "xaas_metering.E064"} <= ids
    settings.METERING = {
        "ADAPTER": "metering.adapters.clickhouse.ClickHouseMeteringAdapter",
        "CLICKHOUSE_URL": "http://127.0.0.1:8123",
    }
    assert check_delivery_settings() == []


def test_a_celery_worker_killed_after_the_insert_bills_nothing_twice(
    django_db_setup, settings, clickhouse_server, clickhouse_db, org, tmp_path
):
    """A real worker (PostgreSQL + RabbitMQ run) SIGKILLed while ClickHouse has stored its batch but the answer is
    still on its way: the batch stays pending, a new worker resends it after the lease, FINAL counts it once."""
    require_worker_services()
    queue = f"ch-test-{uuid.uuid4().hex[:12]}"
    workers: list[CeleryWorker] = []
    try:
        with FaultyProxy(clickhouse_server.url) as proxy:
            metering = clickhouse_metering(
                proxy.url, clickhouse_db, CELERY_QUEUE=queue, CLICKHOUSE_BATCH_SIZE=20, SINK_LEASE_SECONDS=4
            )
            settings.METERING = metering
            ensure_schema()
            proxy.faults = ["hold"]
            workers.append(CeleryWorker(metering, beat=True, tmp=tmp_path, name="ch-0").start())
            expected = record_many(60)
            wait_until(proxy.held.is_set, "a batch stored, its answer held", worker=workers[0])
            workers[0].kill()
            assert states().get("pending", 0) >= 20  # nobody marked the batch in flight
            proxy.release()
            workers.append(CeleryWorker(metering, beat=True, tmp=tmp_path, name="ch-1").start())
            wait_until(lambda: states() == {"delivered": 60}, "everything delivered", worker=workers[1])
            assert proxy.forwarded >= 4  # three batches and the one resent after the kill
    finally:
        for worker in workers:
            worker.stop()
        delete_queue(queue)
    stored = {f"{r['tenant_id']}/{r['transaction_id']}" for r in rows(clickhouse_server, clickhouse_db)}
    assert stored == set(expected)
    assert scalar(clickhouse_server, f"SELECT count() FROM {clickhouse_db}.usage_facts FINAL") == "60"
    settings.METERING = {**settings.METERING, "CLICKHOUSE_URL": clickhouse_server.url}  # the proxy is gone
    assert reconcile_clickhouse() == []


def test_a_hung_network_that_delivers_after_the_timeout_counts_once(clickhouse, clickhouse_db, settings):
    """TCP level (tests/faults.TcpProxy): the request is held on the wire, the sink times out and retries; then
    the held bytes reach ClickHouse after all (stored behind our back), and the resend stores the batch again."""
    table = f"{clickhouse_db}.usage_facts"
    with TcpProxy("127.0.0.1", clickhouse.http_port) as proxy:
        settings.METERING = {
            **settings.METERING,
            "CLICKHOUSE_URL": f"http://127.0.0.1:{proxy.port}",
            "SINK_TIMEOUT_SECONDS": 1,
        }
        record_many(8)
        proxy.hang()
        report = flush()
        assert report.retrying == 8 and report.delivered == 0
        proxy.heal()  # the held request goes through now, to a client that gave up on it
        wait_until(lambda: scalar(clickhouse, f"SELECT count() FROM {table}") == "8", "the late insert", timeout=30)
        drain()
    assert states() == {"delivered": 8}
    # Two copies went to disk (a background merge may already have dropped one): every query counts one.
    assert scalar(clickhouse, f"SELECT count() FROM {table} FINAL") == "8"
    settings.METERING = {**settings.METERING, "CLICKHOUSE_URL": clickhouse.url}  # the proxy is gone
    assert reconcile_clickhouse() == []


def test_commands_name_an_unreachable_or_unconfigured_clickhouse(settings, clickhouse_db):
    from django.core.management.base import CommandError

    from tests.faults import free_port

    settings.METERING = clickhouse_metering(f"http://127.0.0.1:{free_port()}", clickhouse_db)  # nothing listens
    with pytest.raises(CommandError, match="clickhouse: network error"):
        call_command("reconcile_usage", "--sink", "clickhouse", stdout=StringIO())
    with pytest.raises(CommandError, match="network error"):
        call_command("clickhouse_schema", stdout=StringIO())
    settings.METERING = {**settings.METERING, "CLICKHOUSE_URL": None}
    with pytest.raises(CommandError, match="CLICKHOUSE_URL"):
        call_command("clickhouse_schema", stdout=StringIO())
    with pytest.raises(CommandError, match="CLICKHOUSE_URL"):
        call_command("reconcile_usage", "--sink", "clickhouse", stdout=StringIO())
    settings.METERING = {**settings.METERING, "CLICKHOUSE_TABLE": "x;DROP"}
    with pytest.raises(CommandError, match="identifier"):
        call_command("clickhouse_schema", "--print", stdout=StringIO())
