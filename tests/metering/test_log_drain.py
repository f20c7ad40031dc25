"""The log-mode drainer (metering.drain) against a real Redis and the configured database (SQLite or PostgreSQL)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection, connections, transaction

from metering import counters, drain, log
from metering.adapters.database import DatabaseMeteringAdapter
from metering.models import CounterEpoch, LogCursor, LogDeadEntry, LogGap, UsageOutbox, UsageRecord
from metering.signals import usage_recorded
from metering.windows import window
from tenants.models import Tenant
from tenants.tree import move_tenant
from tests.factories import tree
from tests.log_helpers import append, append_raw, assert_facts_match_rollups, log_mode, stored_rollups

pytestmark = pytest.mark.django_db(transaction=True)

ORG = {"org": None, "p1": "org", "p2": "org", "k1": "p1", "k2": "p1", "k3": "p2"}


@pytest.fixture
def logged(redis_cache):
    with log_mode():
        yield redis_cache


def pk(tenant_id: str) -> int:
    return Tenant.objects.get(external_id=tenant_id).pk


def month_counter(redis, tenant_id: str, feature: str = "llm_tokens") -> str:
    root = Tenant.objects.get(external_id=tenant_id).root_pk
    epoch = counters.current_epoch(root, "default")
    start = window("month", datetime.now(UTC))[0]
    return counters.key(root, pk(tenant_id), feature, "month", start, epoch=epoch)


def test_drained_facts_are_rolled_up_at_every_level_and_leave_the_stream(logged):
    tree(ORG)
    ids = [append(logged, tenant, units) for tenant, units in [("k1", 1), ("k2", 20), ("k3", 300), ("p1", 4000)]]
    report = drain.drain()
    assert (report.facts, report.entries, report.duplicates, report.dead) == (4, 4, 0, 0)
    assert UsageRecord.objects.count() == 4
    assert_facts_match_rollups()
    root = pk("org")
    assert logged.xlen(log.stream_key(root)) == 0
    cursor = LogCursor.objects.get(root_id=root)
    assert (cursor.last_entry, cursor.facts) == (ids[-1], 4)
    assert cursor.last_drained_at is not None
    assert report.unlisted == [root] and not logged.sismember(log.trees_key(), root)
    assert not logged.exists(log.listed_key(root))  # the next append lists the tree again


def test_fact_fields_are_kept_exactly(logged):
    tree(ORG)
    moment = datetime(2026, 11, 30, 12, 34, 56, 789012, tzinfo=UTC)
    append(logged, "k1", 123_456_789_012, transaction_id="tx-exact", timestamp=moment, metadata={"model": "é"})
    drain.drain()
    fact = UsageRecord.objects.get()
    assert (fact.tenant_id, fact.feature, fact.units, fact.timestamp, fact.transaction_id, fact.metadata) == (
        pk("k1"),
        "llm_tokens",
        123_456_789_012,
        moment,
        "tx-exact",
        {"model": "é"},
    )


def test_redrain_is_idempotent_even_when_entries_were_not_deleted(logged):
    tree(ORG)
    for number in range(5):
        append(logged, "k1", 10 + number)
    root = pk("org")
    kept = logged.xrange(log.stream_key(root))
    drain.drain()
    before = stored_rollups()
    again = drain.drain_tree(root)
    assert again.facts == 0 and again.entries == 0
    # The cursor restarted from 0-0 (a reopened tree) re-reads persisted entries: nothing counted twice.
    LogCursor.objects.filter(root_id=root).update(last_entry="0-0")
    logged.delete(log.stream_key(root))
    for entry_id, fields in kept:
        logged.execute_command("XADD", log.stream_key(root), entry_id, *[x for pair in fields.items() for x in pair])
    third = drain.drain_tree(root)
    assert (third.facts, third.duplicates) == (0, 5)
    assert stored_rollups() == before
    assert UsageRecord.objects.count() == 5


def test_duplicates_in_one_batch_and_across_batches_are_given_back_to_the_counters(logged):
    tree(ORG)
    drain.open_tree(pk("org"))
    # Live counters exist (a rebuild made them from the database, which is empty): the writer adds to them.
    for tenant in ("org", "p1", "k1"):
        logged.set(month_counter(logged, tenant), "0")
    append(logged, "k1", 5_000_000, transaction_id="first", count=True)
    drain.drain()
    assert int(logged.get(month_counter(logged, "org"))) == 5_000_000
    # "first" again (outside the Redis de-duplication window), and "second" twice in one batch.
    append(logged, "k1", 7_000_000, transaction_id="first", count=True)
    append(logged, "k1", 11_000_000, transaction_id="second", count=True)
    append(logged, "k1", 13_000_000, transaction_id="second", count=True)
    assert int(logged.get(month_counter(logged, "org"))) == 36_000_000
    report = drain.drain()
    assert (report.facts, report.duplicates) == (1, 2)
    facts = dict(UsageRecord.objects.values_list("transaction_id", "units"))
    assert facts == {"first": 5_000_000, "second": 11_000_000}  # the first of a batch's duplicates is the fact
    for tenant in ("org", "p1", "k1"):
        assert int(logged.get(month_counter(logged, tenant))) == 16_000_000  # counters == facts
    assert int(logged.get(month_counter(logged, "p1"))) == 16_000_000
    assert_facts_match_rollups()


def test_a_giveback_is_never_applied_twice_when_the_batch_is_redone(logged):
    tree(ORG)
    append(logged, "k1", 5, transaction_id="same")
    drain.drain()
    logged.set(month_counter(logged, "org"), "12")
    append(logged, "k1", 7, transaction_id="same")
    root = pk("org")

    class Boom(Exception):
        pass

    with pytest.raises(Boom), transaction.atomic():  # the drain's transaction rolls back after its give-back
        drain.drain_tree(root)
        raise Boom
    assert int(logged.get(month_counter(logged, "org"))) == 5  # given back once (12 - 7)
    assert LogCursor.objects.get(root_id=root).facts == 1  # rolled back: the entry is drained again
    report = drain.drain_tree(root)
    assert report.duplicates == 1
    assert int(logged.get(month_counter(logged, "org"))) == 5  # not twice


def test_unknown_tenant_and_undecodable_entries_are_kept_and_do_not_block(logged):
    tree(ORG)
    root = pk("org")
    append(logged, "k1", 1)
    ghost = Tenant.objects.create(external_id="ghost", parent=Tenant.objects.get(external_id="p2"))
    ghost_path = ghost.path
    append(logged, "ghost", 2)
    ghost.delete()
    broken = append_raw(logged, root, "t", "nonsense")
    too_long = append_raw(
        logged,
        root,
        *log.Entry(
            pk("k2"), f"/{root}/{pk('p1')}/{pk('k2')}/", "f" * 101, 3, datetime.now(UTC), "x", datetime.now(UTC), 0
        ).encode(),
    )
    append(logged, "k2", 4)
    report = drain.drain()
    assert (report.facts, report.dead) == (2, 3)
    dead = {row.entry_id: row for row in LogDeadEntry.objects.all()}
    assert set(dead) >= {broken, too_long}
    assert dead[broken].fields == {"t": "nonsense"} and "decoded" in dead[broken].reason
    ghost_row = next(row for row in dead.values() if row.reason == "tenant no longer exists")
    assert ghost_row.fields["p"] == ghost_path and ghost_row.fields["u"] == "2"
    assert logged.xlen(log.stream_key(root)) == 0
    assert_facts_match_rollups()


def test_a_moved_tenant_is_rolled_up_by_its_lineage_at_drain_time(logged):
    tree({**ORG, "other": None})
    append(logged, "k1", 100)  # admitted under org/p1/k1
    # The move itself drains the stream first (subtree_moving): that fact stays with the lineage it had.
    move_tenant("k1", "p2")
    assert UsageRecord.objects.count() == 1
    assert_facts_match_rollups()
    # An entry still carrying the old path (a writer's cached lineage) is rolled up by the new one.
    root = pk("org")
    epoch = int(logged.hget(log.state_key(root), "epoch"))
    stale = log.Entry(
        pk("k1"),
        f"/{root}/{pk('p1')}/{pk('k1')}/",
        "llm_tokens",
        7,
        datetime.now(UTC),
        "late",
        datetime.now(UTC),
        epoch,
    )
    append_raw(logged, root, *stale.encode())
    drain.drain()
    assert_facts_match_rollups()
    rollups = stored_rollups()
    assert sum(units for (tenant, _, _), (units, _) in rollups.items() if tenant == pk("p2")) == 107
    assert sum(units for (tenant, _, _), (units, _) in rollups.items() if tenant == pk("p1")) == 0


def test_a_move_drains_facts_not_yet_durable_before_the_paths_change(redis_cache):
    tree(ORG)
    with log_mode(LOG_DRAIN_DELAY_SECONDS=0.3):
        append(redis_cache, "k1", 100)
        move_tenant("k1", "p2")  # waits out the 0.3 s delay inside the move
        assert UsageRecord.objects.count() == 1
        assert_facts_match_rollups()


def test_entries_younger_than_the_delay_wait(redis_cache):
    tree(ORG)
    with log_mode(LOG_DRAIN_DELAY_SECONDS=30):
        append(redis_cache, "k1", 1)
        report = drain.drain()
        assert (report.facts, report.waiting) == (0, 1)
        assert redis_cache.sismember(log.trees_key(), pk("org"))  # still listed
    with log_mode(LOG_DRAIN_DELAY_SECONDS=0):
        assert drain.drain().facts == 1


def test_delay_follows_the_fsync_policy(redis_cache):
    with log_mode(LOG_DRAIN_DELAY_SECONDS=None):
        policy = drain.fsync_policy(redis_cache)
        assert policy in ("off", "always", "everysec", "no")
        assert drain.drain_delay(redis_cache) == (0.0 if policy == "always" else 2.0)


def test_outbox_rows_are_written_once_per_inserted_fact(redis_cache):
    tree(ORG)
    with log_mode(ADAPTER="metering.adapters.webhook.WebhookMeteringAdapter", SINK_URL="http://127.0.0.1:9/x"):
        for number in range(3):
            append(redis_cache, "k1", 1, transaction_id=f"t{number}")
        append(redis_cache, "k1", 1, transaction_id="t0")
        drain.drain()
        drain.drain()
    rows = list(UsageOutbox.objects.values_list("record_id", "sink"))
    assert sorted(rows) == sorted((fact, "webhook") for fact in UsageRecord.objects.values_list("id", flat=True))
    assert len(rows) == 3


class PerFactAdapter(DatabaseMeteringAdapter):
    """An adapter with commit mode's per-fact hook only (no ``on_stored_many``), like a project's own outbox."""

    seen: list[tuple[str, str, int, bool]] = []

    def on_stored(self, valid, record_id, context) -> None:
        in_batch = connection.in_atomic_block
        self.seen.append((context.tenant_id, valid.transaction_id, record_id, in_batch))


def test_an_adapter_with_only_on_stored_gets_it_per_fact_in_the_batch(redis_cache):
    tree(ORG)
    PerFactAdapter.seen.clear()
    with log_mode(ADAPTER="tests.metering.test_log_drain.PerFactAdapter"):
        append(redis_cache, "k1", 1, transaction_id="a")
        append(redis_cache, "k3", 1, transaction_id="b")
        append(redis_cache, "k3", 1, transaction_id="b")  # a duplicate: no fact, no hook
        drain.drain()
        drain.drain()
    ids = dict(UsageRecord.objects.values_list("transaction_id", "id"))
    assert sorted(PerFactAdapter.seen) == [("k1", "a", ids["a"], True), ("k3", "b", ids["b"], True)]


def test_usage_recorded_fires_at_drain_time_once_per_fact(logged):
    tree(ORG)
    seen: list[tuple[str, str, int]] = []

    def receiver(sender, event, record_id, context, **kwargs):
        seen.append((context.tenant_id, event.transaction_id, record_id))
        raise RuntimeError("a failing receiver must not undo the drain")

    usage_recorded.connect(receiver, dispatch_uid="test-drain-receiver")
    try:
        append(logged, "k1", 1, transaction_id="a")
        append(logged, "k3", 1, transaction_id="b")
        append(logged, "k3", 1, transaction_id="b")
        assert seen == []
        drain.drain()
    finally:
        usage_recorded.disconnect(dispatch_uid="test-drain-receiver")
    ids = dict(UsageRecord.objects.values_list("transaction_id", "id"))
    assert sorted(seen) == [("k1", "a", ids["a"]), ("k3", "b", ids["b"])]


# ---- open_tree, drain_locked ----


def test_open_tree_is_idempotent_and_bumps_the_epoch_once(logged):
    tree(ORG)
    root = pk("org")
    generation = drain.open_tree(root)
    assert len(generation) == 32
    epoch = CounterEpoch.objects.get(root_id=root).epoch
    assert drain.open_tree(root) == generation
    assert CounterEpoch.objects.get(root_id=root).epoch == epoch
    assert logged.hgetall(log.state_key(root)) == {b"gen": generation.encode(), b"epoch": str(epoch).encode()}
    assert not LogGap.objects.exists()  # a first opening expects nothing


def test_redis_flushed_means_a_gap_a_new_generation_and_a_bumped_epoch(logged, caplog):
    tree(ORG)
    root = pk("org")
    append(logged, "k1", 1)
    drain.drain()
    cursor = LogCursor.objects.get(root_id=root)
    old_generation, old_epoch = cursor.generation, CounterEpoch.objects.get(root_id=root).epoch
    append(logged, "k1", 2)  # admitted, never drained: lost with the flush
    logged.flushdb()
    generation = drain.open_tree(root)
    assert generation != old_generation
    gap = LogGap.objects.get()
    assert (gap.root_id, gap.generation, gap.after_entry) == (root, old_generation, cursor.last_entry)
    assert gap.last_drained_at == cursor.last_drained_at
    assert "may be missing" in gap.note
    assert any(record.levelname == "ERROR" and cursor.last_entry in record.getMessage() for record in caplog.records)
    new_epoch = CounterEpoch.objects.get(root_id=root).epoch
    assert new_epoch != old_epoch
    assert int(logged.hget(log.state_key(root), "epoch")) == new_epoch
    assert LogCursor.objects.get(root_id=root).last_entry == "0-0"
    # New ids are past every id the database saw.
    new_id = append(logged, "k1", 3)
    assert drain._id(new_id) > drain._id(cursor.last_entry)
    assert drain.drain().facts == 1
    assert UsageRecord.objects.count() == 2
    assert LogGap.objects.count() == 1


def test_the_drainer_detects_a_flush_without_any_writer(logged):
    tree(ORG)
    root = pk("org")
    append(logged, "k1", 1)
    drain.drain()
    logged.flushdb()
    logged.sadd(log.trees_key(), root)
    report = drain.drain_tree(root)
    assert report.gaps == 1 and LogGap.objects.count() == 1
    assert logged.hget(log.state_key(root), "gen").decode() == LogCursor.objects.get(root_id=root).generation


def test_redis_back_with_older_data_is_detected(logged):
    tree(ORG)
    root = pk("org")
    append(logged, "k1", 1)
    old = logged.xrange(log.stream_key(root))
    state = logged.hgetall(log.state_key(root))
    append(logged, "k1", 2)
    drain.drain()
    epoch = CounterEpoch.objects.get(root_id=root).epoch
    last = LogCursor.objects.get(root_id=root).last_entry
    # Restored from a backup taken after the first append: same generation, a stream that ends before the cursor.
    logged.delete(log.stream_key(root))
    for entry_id, fields in old:
        logged.execute_command("XADD", log.stream_key(root), entry_id, *[x for pair in fields.items() for x in pair])
    logged.hset(log.state_key(root), mapping=state)
    logged.sadd(log.trees_key(), root)
    report = drain.drain_tree(root)
    assert report.gaps == 1
    gap = LogGap.objects.get()
    assert gap.after_entry == last and "older" in gap.note
    new_epoch = CounterEpoch.objects.get(root_id=root).epoch
    assert new_epoch != epoch and int(logged.hget(log.state_key(root), "epoch")) == new_epoch
    assert drain._id(logged.xinfo_stream(log.stream_key(root))["last-generated-id"].decode()) >= drain._id(last)
    assert UsageRecord.objects.count() == 2  # the restored entry was persisted already: nothing twice
    assert drain.drain_tree(root).gaps == 0


def test_drain_locked_returns_the_cursor_and_holds_the_batch_back(logged):
    tree(ORG)
    root = pk("org")
    with transaction.atomic():
        assert drain.drain_locked(root) == "0-0"
    entry = append(logged, "k1", 1)
    drain.drain()
    append(logged, "k1", 2)
    with transaction.atomic():
        assert drain.drain_locked(root) == entry
        if connection.vendor == "postgresql":  # SQLite: the other drainer would wait for this IMMEDIATE transaction
            reports: list[drain.DrainReport] = []

            def other_drainer() -> None:
                reports.append(drain.drain_tree(root))
                connections.close_all()

            worker = threading.Thread(target=other_drainer)
            worker.start()
            worker.join(10)
            assert reports[0].skipped == 1 and reports[0].facts == 0  # SKIP LOCKED: held by the rebuild
    assert drain.drain_tree(root).facts == 1


def test_a_stream_of_a_tree_whose_root_is_gone_is_left_alone(logged):
    tree({"lonely": None})
    root = pk("lonely")
    append(logged, "lonely", 1)
    drain.drain()
    LogCursor.objects.filter(root_id=root).delete()
    UsageRecord.objects.all().delete()
    Tenant.objects.filter(pk=root).delete()
    append_raw(logged, root, "t", str(root))
    report = drain.drain()
    assert report.skipped == 1 and logged.xlen(log.stream_key(root)) == 1


def test_many_batches(logged):
    tree(ORG)
    with log_mode(LOG_DRAIN_BATCH=7):
        for number in range(30):
            append(logged, ["k1", "k2", "k3"][number % 3], number + 1)
        report = drain.drain()
    assert (report.batches, report.facts) == (5, 30)
    assert_facts_match_rollups()


def test_pending_and_lag(logged):
    tree(ORG)
    with log_mode(LOG_DRAIN_DELAY_SECONDS=30):
        append(logged, "k1", 1)
        append(logged, "k2", 1)
        status = drain.pending()
    assert status["entries"] == 2
    assert status["trees"][0]["root_pk"] == pk("org")
    assert 0 <= status["oldest_age_seconds"] < 30


def test_an_hour_boundary_and_old_facts(logged):
    tree(ORG)
    base = datetime(2026, 11, 1, 10, 59, 59, tzinfo=UTC)
    append(logged, "k1", 1, timestamp=base)
    append(logged, "k1", 2, timestamp=base + timedelta(seconds=1))
    drain.drain()
    assert_facts_match_rollups()
    assert len({bucket for (_, _, bucket) in stored_rollups()}) == 2


def test_the_fast_decoder_reads_what_the_codec_reads(logged):
    tree(ORG)
    moment = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    samples = [
        log.Entry(7, "/1/7/", "f", 0, moment, "x", moment, 3),
        log.Entry(7, "/1/7/", "fé:a", 10**18, moment, "tx/é", moment, -1, {"a": [1, "é"]}, 42),
    ]
    for sample in samples:
        entry_id = logged.execute_command("XADD", "xaas-test-codec", "*", *sample.encode()).decode()
        ((read_id, fields),) = logged.xrange("xaas-test-codec", entry_id, entry_id)
        assert drain._fast_decode(read_id.decode(), fields) == log.Entry.decode(read_id, fields)
    logged.delete("xaas-test-codec")


def test_an_entry_that_is_not_utf8_is_a_dead_entry(logged):
    tree(ORG)
    root = pk("org")
    good = log.Entry(pk("k1"), f"/{root}/{pk('p1')}/{pk('k1')}/", "f", 1, datetime.now(UTC), "ok", datetime.now(UTC), 0)
    fields = good.encode()
    fields[fields.index("x") + 1] = b"\xff\xfe"  # type: ignore[call-overload]
    drain.open_tree(root)
    entry_id = logged.execute_command("XADD", log.stream_key(root), "*", *fields).decode()
    logged.sadd(log.trees_key(), root)
    report = drain.drain()
    assert report.dead == 1 and report.facts == 0
    row = LogDeadEntry.objects.get(entry_id=entry_id)
    assert row.fields["x"] == "\\xff\\xfe" and "UnicodeDecodeError" in row.reason


def test_end_to_end_through_the_writer_facts_rollups_counters_outbox(redis_cache):
    """The real log-mode writer (metering.appender through get_meter()) and the drainer: a transaction id reused
    after the de-duplication window is admitted, counted, then stored once and given back."""
    import time as clock

    from metering import UsageEvent, get_meter
    from metering.usage import get_usage

    tree(ORG)
    with log_mode(LOG_DEDUP_SECONDS=1, **{"ADAPTER": "metering.adapters.webhook.WebhookMeteringAdapter"}):
        meter = get_meter()
        for tenant, quantity, tx in [("k1", 2, "a"), ("k2", 3, "b"), ("k3", 5, "c")]:
            meter.record_usage_sync(UsageEvent(tenant, "llm_tokens", quantity, transaction_id=tx))
        start, end = window("month", datetime.now(UTC))
        assert get_usage("org", "llm_tokens", start, end) == 10  # the live counter, facts not drained yet
        drain.drain()
        clock.sleep(1.2)  # past the Redis de-duplication window
        meter.record_usage_sync(UsageEvent("k1", "llm_tokens", 7, transaction_id="a"))
        assert get_usage("org", "llm_tokens", start, end) == 17  # admitted and counted at request time
        report = drain.drain()
        assert (report.facts, report.duplicates) == (0, 1)
        for tenant, expected in [("org", 10), ("p1", 5), ("k1", 2), ("p2", 5)]:
            assert get_usage(tenant, "llm_tokens", start, end) == expected  # given back: counters == facts
    assert UsageRecord.objects.count() == 3
    assert sorted(UsageOutbox.objects.values_list("record_id", flat=True)) == sorted(
        UsageRecord.objects.values_list("id", flat=True)
    )
    assert_facts_match_rollups()


def test_the_staging_table_is_there_for_every_batch_even_after_a_session_reset(logged, on_postgres):
    """The COPY staging table is session state: a pooler's DISCARD ALL/TEMP (or a reconnect) drops it under the
    drainer. Each batch finds it (it was an UndefinedTable error on every later batch of that connection)."""
    tree(ORG)
    append(logged, "k1", 1, transaction_id="a")
    drain.drain()
    with connection.cursor() as cursor:
        cursor.execute("DISCARD TEMP")
    append(logged, "k1", 1, transaction_id="b")
    drain.drain()
    assert sorted(UsageRecord.objects.values_list("transaction_id", flat=True)) == ["a", "b"]
    assert_facts_match_rollups()
