"""Adversarial cases for log mode (the writer + the drainer) found by review, each a real bug or a guarantee checked."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.db import connection

from metering import UsageEvent, appender, counters, drain, get_meter, log
from metering.events import max_quantity_units
from metering.models import LogDeadEntry, LogGap, UsageRecord
from tenants.models import Tenant
from tests.factories import tree
from tests.log_helpers import assert_facts_match_rollups, log_mode

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_snapshots():
    appender.forget_snapshots()
    yield
    appender.forget_snapshots()


@pytest.fixture
def logged(redis_cache):
    with log_mode():
        yield redis_cache


def pk(tenant_id: str) -> int:
    return Tenant.objects.get(external_id=tenant_id).pk


def test_an_hour_past_the_rollup_range_does_not_block_the_drain_of_other_trees(logged):
    """SQLite's rollup rows hold at most 2**63 - 1 units: commit mode refuses the fact that would pass it
    (``UsageTotalOutOfRange``). Log mode admits it (the script's counters are bignums); the drainer keeps the facts
    the range refuses as dead entries and gives them back (it was a poison batch: the tree's stream, and every tree
    drained in the same transaction, never drained again)."""
    if connection.vendor != "sqlite":
        pytest.skip("PostgreSQL's rollup slots hold 10**36 units: unreachable with MAX_QUANTITY facts")
    tree({"big": None, "bk": "big"})
    tree({"other": None, "ok": "other"})
    biggest = max_quantity_units()
    meter = get_meter()
    count = (2**63 - 1) // biggest + 1  # one more than the hour's rollup row can hold
    moment = datetime.now(UTC).replace(minute=0, second=1, microsecond=0)
    for number in range(count):
        meter.record_usage_sync(
            UsageEvent("bk", "llm_tokens", biggest / 10**6, transaction_id=f"b-{number}", timestamp=moment)
        )
    meter.record_usage_sync(UsageEvent("ok", "llm_tokens", 1, transaction_id="o-1"))
    drain.drain()  # must not raise: one tree's hostile hour cannot stop the drain
    assert UsageRecord.objects.filter(tenant__external_id="ok").count() == 1
    stored = sum(UsageRecord.objects.filter(tenant__external_id="bk").values_list("units", flat=True))
    assert stored <= 2**63 - 1
    assert logged.xlen(log.stream_key(pk("big"))) == 0
    assert_facts_match_rollups()
    refused = LogDeadEntry.objects.filter(reason="hourly rollup total out of range")
    assert stored + refused.count() * biggest == count * biggest  # each fact stored or kept dead, never both


def test_a_batch_that_fails_half_way_stores_nothing(logged, api):
    """The events API promises all or nothing. The second event of the batch meets a real Redis error (its
    de-duplication key is of the wrong type). A key's events are all in its own tree, and a tree's facts of a batch
    go in one script call that reads every de-duplication key before it writes anything (``log_append_many.lua``)."""
    tenant = Tenant.objects.get(external_id="acme-search-key-1")
    logged.hset(log.dedup_key(tenant.root_pk, tenant.pk, "tx-b"), "x", "1")
    body = {
        "events": [
            {"tenant_id": "acme-chat-key-1", "feature_name": "a_feature", "quantity": "10", "transaction_id": "tx-a"},
            {"tenant_id": "acme-search-key-1", "feature_name": "b_feature", "quantity": "5", "transaction_id": "tx-b"},
        ]
    }
    response = api.post("/api/v1/events", body, key="org")
    assert response.status_code == 503, response.content
    drain.drain()
    assert UsageRecord.objects.count() == 0  # the caller was told nothing was stored


def test_dropping_a_trees_counters_keeps_its_log(logged):
    """``counters.drop_trees`` (``forget_trees``' fallback when the database refuses the epoch bump) deleted every key
    of the tree's tag: in log mode also the stream (admitted facts not drained yet: lost), its state (a needless
    reopening with a ``LogGap``) and the give-back markers (an entry given back twice: an under-count)."""
    tree({"org": None, "k1": "org"})
    meter = get_meter()
    meter.record_usage_sync(UsageEvent("k1", "llm_tokens", 2, transaction_id="d-1"))
    meter.record_usage_sync(UsageEvent("k1", "llm_tokens", 3, transaction_id="d-2"))
    root = pk("org")
    counters.drop_trees([root])
    assert logged.xlen(log.stream_key(root)) == 2 and logged.exists(log.state_key(root))
    drain.drain()
    assert sorted(UsageRecord.objects.values_list("transaction_id", flat=True)) == ["d-1", "d-2"]
    assert not LogGap.objects.exists()


HOSTILE_METADATA = {
    "tab\tkey": "a\tb",
    "newline": "line1\nline2\r\nline3",
    "backslash": "C:\\path\\N\\.\\\\",
    "escape_text": "\\u0000 and \\x00 as plain text",
    "copy_end": "\\.",
    "quotes": "\"'`",
    "unicode": "é 漢字 \U0001f600 \u2028\u2029 \ufeff",
    "control": "\x01\x07\x1b\x7f",
    "numbers": [0, -1, 10**30, 0.1, 1e-7, -0.0],
    "nested": {"null": None, "bool": [True, False], "empty": {}, "list": []},
}


def test_hostile_metadata_and_transaction_ids_are_stored_exactly(logged):
    """What the stream codec and the drainer's COPY (PostgreSQL) or VALUES (SQLite) must carry unchanged."""
    tree({"org": None, "k1": "org"})
    meter = get_meter()
    ids = ["a\\b", "tab-\\t-like", "\\N", "\\.", "q\"uote'", "x" * 128, "{json}", "%s%%"]
    for number, transaction_id in enumerate(ids):
        meter.record_usage_sync(
            UsageEvent("k1", "llm_tokens", number + 1, transaction_id=transaction_id, metadata=HOSTILE_METADATA)
        )
    report = drain.drain()
    assert (report.facts, report.dead, report.duplicates) == (len(ids), 0, 0)
    stored = dict(UsageRecord.objects.values_list("transaction_id", "metadata"))
    assert set(stored) == set(ids)
    for metadata in stored.values():
        assert metadata == HOSTILE_METADATA
    assert_facts_match_rollups()


def test_a_fact_appended_during_a_move_counts_against_the_new_trees_quota(logged):
    from quotas.exceptions import QuotaExceeded
    from quotas.handler import QuotaPolicyHandler
    from tenants.signals import subtree_moved
    from tenants.tree import move_tenant
    from tests.quota_helpers import limit

    tree({"org1": None, "k1": "org1"})
    tree({"org2": None})
    limit("org2", 100)
    meter = get_meter()
    meter.record_usage_sync(UsageEvent("k1", "llm_tokens", 1, transaction_id="warm"))  # this process's snapshot
    drain.drain()

    def write_meanwhile(**kwargs):
        # Another process with a warm snapshot writing while the move's transaction is open: only Redis is touched.
        meter.record_usage_sync(UsageEvent("k1", "llm_tokens", 30, transaction_id="during-move"))

    subtree_moved.connect(write_meanwhile, dispatch_uid="attack-write-during-move")
    try:
        move_tenant("k1", "org2")
    finally:
        subtree_moved.disconnect(dispatch_uid="attack-write-during-move")
    handler = QuotaPolicyHandler("k1")
    handler.consume("llm_tokens", 1, transaction_id="after-move")  # the new tree's counters are built
    drain.drain()
    assert UsageRecord.objects.filter(transaction_id="during-move", tenant__external_id="k1").exists()
    # org2's quota now has 1 (warm, moved) + 30 + 1 = 32 of 100 used: 69 fits, 70 would pass it.
    handler.consume("llm_tokens", 68, transaction_id="fits")
    with pytest.raises(QuotaExceeded):
        handler.consume("llm_tokens", 1, transaction_id="past")
    stored = sum(UsageRecord.objects.filter(tenant__path__startswith=f"/{pk('org2')}/").values_list("units", flat=True))
    assert stored <= 100 * 10**6


class _Boom(Exception):
    pass


@pytest.mark.xfail(
    strict=True,
    reason="log mode appends to Redis at once, outside the caller's transaction: a consume inside an atomic() the "
    "caller rolls back is still drained into a fact (commit mode rolls the fact back with it)",
)
def test_a_consume_rolled_back_by_the_callers_transaction_stores_no_fact(logged):
    from django.db import transaction

    from quotas.handler import QuotaPolicyHandler

    tree({"org": None, "k1": "org"})
    with pytest.raises(_Boom), transaction.atomic():
        QuotaPolicyHandler("k1").consume("llm_tokens", 7, transaction_id="rolled-back")
        raise _Boom
    drain.drain()
    assert not UsageRecord.objects.filter(transaction_id="rolled-back").exists()


def test_add_many_refuses_a_batch_sum_past_sqlite_range_by_name(db):
    """SQLite: a batch whose own sum for one hour passes 2**63 - 1 is ``UsageTotalOutOfRange`` (was the driver's
    ``OverflowError``), and nothing is written."""
    from metering import rollups
    from metering.exceptions import UsageTotalOutOfRange
    from metering.models import UsageRollup

    if connection.vendor != "sqlite":
        pytest.skip("PostgreSQL's bound is a numeric column, tested with the rollup slots")
    tree({"org": None})
    hour = datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(UsageTotalOutOfRange):
        rollups.add_many([(pk("org"), "f", hour, 2**62, 1), (pk("org"), "f", hour, 2**62, 1)])
    assert not UsageRollup.objects.exists()


@pytest.mark.parametrize("seconds", [0, -5, 0.5])
def test_a_dedup_window_redis_cannot_set_is_refused_before_anything_is_written(redis_cache, seconds):
    """``LOG_DEDUP_SECONDS`` of 0 (or below one second) made the script's ``SET ... EX`` fail *after* it had counted
    and appended the fact: the caller got a 503 "nothing was written" while the fact was stored and counted, and a
    retry without a transaction id stored it twice. Now: check E005, and ``ImproperlyConfigured`` before any write."""
    from django.core.exceptions import ImproperlyConfigured

    from metering.checks import check_metering_settings

    tree({"org": None, "k1": "org"})
    with log_mode(LOG_DEDUP_SECONDS=seconds):
        assert "xaas_metering.E005" in {message.id for message in check_metering_settings()}
        with pytest.raises(ImproperlyConfigured):
            get_meter().record_usage_sync(UsageEvent("k1", "llm_tokens", 1, transaction_id="w-1"))
    root = pk("org")
    assert not redis_cache.exists(log.stream_key(root)) or redis_cache.xlen(log.stream_key(root)) == 0
