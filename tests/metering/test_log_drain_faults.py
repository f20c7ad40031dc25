"""The log-mode drainer under faults: drainers SIGKILLed mid-batch, parallel drainers (real processes), Redis
restarted with AOF, restored from an older copy, down; its operations (command, Celery task, system checks)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection
from django.test import override_settings

from metering import checks, counters, drain, log
from metering.models import LogCursor, LogGap, UsageOutbox, UsageRecord
from metering.tasks import drain_log
from tenants.models import Tenant
from tests.factories import tree
from tests.faults import RedisServer, wait_until
from tests.log_helpers import append, assert_facts_match_rollups, log_mode

pytestmark = pytest.mark.django_db(transaction=True)
pytest_plugins = ["tests.lago_fixtures"]

ORG = {"org": None, "p1": "org", "p2": "org", "k1": "p1", "k2": "p1", "k3": "p2"}
ROOT_DIR = Path(__file__).resolve().parent.parent.parent
WEBHOOK = {"ADAPTER": "metering.adapters.webhook.WebhookMeteringAdapter", "SINK_URL": "http://127.0.0.1:9/usage"}


@pytest.fixture
def logged(redis_cache):
    with log_mode():
        yield redis_cache


def pk(tenant_id: str) -> int:
    return Tenant.objects.get(external_id=tenant_id).pk


def start_worker(tmp_path: Path, mode: str, **extra: Any) -> tuple[subprocess.Popen[str], Path]:
    marker = tmp_path / f"marker-{time.monotonic_ns()}"
    config = {
        "database": {key: connection.settings_dict.get(key) for key in ("NAME", "HOST", "PORT", "USER")},
        "caches": settings.CACHES,
        "metering": {**settings.METERING},
        "mode": mode,
        "marker": str(marker),
        **extra,
    }
    config["database"]["NAME"] = str(config["database"]["NAME"])
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.drain_worker", json.dumps(config, default=str)],
        cwd=ROOT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, marker


def kill_at_marker(process: subprocess.Popen[str], marker: Path) -> None:
    try:
        wait_until(lambda: marker.exists() or process.poll() is not None, 60, "the drainer to reach its pause")
        assert process.poll() is None, process.communicate()[1][-3000:]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


def fill(redis: Any, entries: int, *, duplicates: int = 0) -> None:
    tenants = ["k1", "k2", "k3", "p1", "p2", "org"]
    for number in range(entries):
        append(redis, tenants[number % len(tenants)], 1000 + number, transaction_id=f"tx-{number}", count=True)
    for number in range(duplicates):  # admitted again outside the Redis de-duplication window
        append(redis, tenants[number % len(tenants)], 7, transaction_id=f"tx-{number}", count=True)


def month_counters(redis: Any) -> dict[int, int]:
    from datetime import UTC, datetime

    from metering.windows import window

    root = pk("org")
    epoch = counters.current_epoch(root, "default")
    start = window("month", datetime.now(UTC))[0]
    values = {}
    for tenant in Tenant.objects.all():
        value = redis.get(counters.key(root, tenant.pk, "llm_tokens", "month", start, epoch=epoch))
        if value is not None:
            values[tenant.pk] = int(value)
    return values


def sums_by_level() -> dict[int, int]:
    from tests.log_helpers import stored_rollups

    totals: dict[int, int] = {}
    for (tenant, _, _), (units, _) in stored_rollups().items():
        totals[tenant] = totals.get(tenant, 0) + units
    return totals


def seed_counters(redis: Any) -> None:
    """Live counters of every tenant (a rebuild from the empty database): the writer's increments land in them."""
    from datetime import UTC, datetime

    from metering.windows import window

    root = pk("org")
    drain.open_tree(root)
    epoch = counters.current_epoch(root, "default")
    start = window("month", datetime.now(UTC))[0]
    for tenant in Tenant.objects.all():
        redis.set(counters.key(root, tenant.pk, "llm_tokens", "month", start, epoch=epoch), "0")


@pytest.mark.parametrize("mode", ["pause_before_commit", "pause_after_commit"])
def test_a_drainer_killed_mid_batch_then_another_drains_each_fact_exactly_once(redis_cache, tmp_path, mode):
    tree(ORG)
    with log_mode(LOG_DRAIN_BATCH=40, **WEBHOOK):
        seed_counters(redis_cache)
        fill(redis_cache, 150, duplicates=30)
        process, marker = start_worker(tmp_path, mode, pause_batch=3)
        kill_at_marker(process, marker)
        committed = LogCursor.objects.get(root_id=pk("org")).facts
        assert committed == (80 if mode == "pause_before_commit" else 120)  # the killed batch: all or nothing
        report = drain.drain()
        assert not redis_cache.xlen(log.stream_key(pk("org")))
    assert report.facts == 150 - committed
    assert UsageRecord.objects.count() == 150
    assert sorted(UsageRecord.objects.values_list("transaction_id", flat=True)) == sorted(f"tx-{n}" for n in range(150))
    outbox = list(UsageOutbox.objects.values_list("record_id", flat=True))
    assert sorted(outbox) == sorted(UsageRecord.objects.values_list("id", flat=True))  # once per fact
    assert_facts_match_rollups()
    # counters == facts at every level: each duplicate given back exactly once, the killed batch's included.
    assert month_counters(redis_cache) == {tenant: units for tenant, units in sums_by_level().items()}


def test_drainers_in_parallel_processes_take_disjoint_trees_and_persist_each_fact_once(redis_cache, tmp_path):
    trees = 24
    for number in range(trees):
        tree({f"org{number}": None, f"org{number}-p": f"org{number}", f"org{number}-k": f"org{number}-p"})
    with log_mode(LOG_DRAIN_BATCH=25):
        for number in range(trees * 40):
            tenant = f"org{number % trees}" + ["", "-p", "-k"][number % 3]
            append(redis_cache, tenant, number + 1, transaction_id=f"tx-{number}")
        workers = [start_worker(tmp_path, "run", seconds=120) for _ in range(3)]
        results = []
        for process, _ in workers:
            out, err = process.communicate(timeout=180)
            assert process.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(result["facts"] for result in results) == trees * 40
    assert sum(result["duplicates"] for result in results) == 0
    assert UsageRecord.objects.count() == trees * 40
    assert_facts_match_rollups()
    if connection.vendor == "postgresql":
        assert sum(1 for result in results if result["facts"]) >= 2  # they really shared the work


def test_redis_restarted_with_aof_loses_nothing_and_doubles_nothing(redis_server):
    tree(ORG)
    with log_mode(LOG_DRAIN_BATCH=50, LOG_DRAIN_DELAY_SECONDS=None):
        redis = counters.client()
        fill(redis, 200)
        assert drain.drain_delay(redis) == 0.0  # appendfsync always: every append is on disk before its answer
        first = drain.drain(max_batches=2)
        assert first.facts == 100
        redis_server.stop()
        redis_server.start()
        redis = counters.client()
        assert redis.xlen(log.stream_key(pk("org"))) == 100
        for number in range(200, 230):
            append(redis, "k1", 1, transaction_id=f"tx-{number}")
        second = drain.drain()
    assert second.facts == 130 and second.duplicates == 0 and second.gaps == 0
    assert UsageRecord.objects.count() == 230
    assert not LogGap.objects.exists()
    assert_facts_match_rollups()


def test_redis_restored_from_an_older_copy_is_detected(redis_server):
    tree(ORG)
    with log_mode():
        redis = counters.client()
        fill(redis, 10)
        drain.drain()
        redis_server.stop()
        backup = Path(redis_server.dir + "-backup")
        shutil.copytree(redis_server.dir, backup)
        redis_server.start()
        redis = counters.client()
        fill(redis, 0)
        append(redis, "k1", 5, transaction_id="after-the-backup")
        drain.drain()
        persisted_to = LogCursor.objects.get(root_id=pk("org")).last_entry
        epoch = counters.current_epoch(pk("org"), "default")
        redis_server.stop()
        shutil.rmtree(redis_server.dir)
        shutil.copytree(backup, redis_server.dir)
        shutil.rmtree(backup)
        redis_server.start()
        redis = counters.client()
        redis.sadd(log.trees_key(), pk("org"))
        report = drain.drain()
        assert report.gaps == 1
        gap = LogGap.objects.get()
        assert gap.after_entry == persisted_to and "older" in gap.note
        assert counters.current_epoch(pk("org"), "default") != epoch
        assert int(redis.hget(log.state_key(pk("org")), "epoch")) == counters.current_epoch(pk("org"), "default")
        later = append(redis, "k2", 1, transaction_id="after-the-restore")
        assert drain._id(later) > drain._id(persisted_to)
        assert drain.drain().facts == 1
    assert UsageRecord.objects.count() == 12
    assert_facts_match_rollups()


def test_redis_down_is_a_named_error_and_nothing_is_half_written(redis_server):
    tree(ORG)
    with log_mode():
        redis = counters.client()
        fill(redis, 20)
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(drain.LogUnavailable):
            drain.drain()
        assert time.monotonic() - started < 5
        assert UsageRecord.objects.count() == 0
        time.sleep(0.6)  # the breaker's cool-down
        redis_server.start()
        assert drain.drain().facts == 20
    assert_facts_match_rollups()


# ---- operations ----


def test_the_command_once_and_max_batches(logged):
    tree(ORG)
    with log_mode(LOG_DRAIN_BATCH=10):
        fill(logged, 35)
        call_command("metering_drain", "--once", "--max-batches", "2", stdout=open(os.devnull, "w"))  # noqa: SIM115
        assert UsageRecord.objects.count() == 20
        from io import StringIO

        out = StringIO()
        call_command("metering_drain", "--once", stdout=out)
        assert "total: 15 facts persisted" in out.getvalue()
    assert UsageRecord.objects.count() == 35


def test_the_command_stops_gracefully_on_sigterm(redis_cache, tmp_path):
    tree(ORG)
    with log_mode():
        process, marker = start_worker(tmp_path, "command", args=["--idle", "0.05"])
        wait_until(lambda: marker.exists() or process.poll() is not None, 60, "metering_drain to start")
        time.sleep(1.5)  # django setup and a few idle passes
        fill(redis_cache, 12)
        wait_until(lambda: UsageRecord.objects.count() == 12, 30, "the running drainer to persist the facts")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err[-3000:]
    assert "total: 12 facts persisted" in out


def test_the_celery_task_drains_a_bounded_amount_per_run(logged, private_queue):
    tree(ORG)
    # apply(): the task runs here, whatever the broker; with one, its follow-up goes to a queue of this test's own.
    with log_mode(LOG_DRAIN_BATCH=5, LOG_DRAIN_TASK_BATCHES=2, CELERY_QUEUE=private_queue):
        fill(logged, 13)
        result = drain_log.apply().get()
        assert result["facts"] == 10 and result["more"] is True  # bounded; a worker gets a follow-up task
        result = drain_log.apply().get()
        assert result["facts"] == 3 and result["more"] is False
    with override_settings(METERING={**settings.METERING, "WRITE_MODE": "commit"}):
        assert drain_log.apply().get() == {"mode": "commit"}


def test_the_beat_schedules_the_drain():
    from project import settings as example_settings  # the beat schedule is the example project's

    assert example_settings.CELERY_BEAT_SCHEDULE["metering-drain-log"]["task"] == "metering.drain_log"


def test_status_shows_lag_and_gaps(logged):
    from io import StringIO

    tree(ORG)
    with log_mode(LOG_DRAIN_DELAY_SECONDS=60):
        fill(logged, 3)
        out = StringIO()
        call_command("metering_status", "--json", stdout=out)
        data = json.loads(out.getvalue())["log"]
        assert data["pending"] == 3 and data["trees"][0]["tenant_id"] == "org"
        assert data["oldest_pending_age_seconds"] < 60
        assert data["alerts"] == []
        logged.flushdb()
        drain.open_tree(pk("org"))
        out = StringIO()
        from django.core.management.base import CommandError

        with pytest.raises(CommandError):
            call_command("metering_status", "--check", stdout=out)
        assert "GAP org" in out.getvalue() and "ALERT: log gaps" in out.getvalue()


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("aof-always", set()),
        ("aof-off", {"xaas_metering.E041"}),
        ("fsync-no", {"xaas_metering.W040"}),
        ("config-refused", {"xaas_metering.W041"}),
        ("down", {"xaas_metering.W042"}),
    ],
)
def test_log_mode_checks_read_the_servers_persistence(setup, expected):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(appendonly=setup != "aof-off") as server:
        url = server.url
        if setup == "fsync-no":
            server.client().config_set("appendfsync", "no")
        if setup == "config-refused":
            server.client().execute_command("ACL", "SETUSER", "limited", "on", ">secret", "~*", "+@all", "-config")
            url = f"redis://limited:secret@127.0.0.1:{server.port}/0"
        if setup == "down":
            server.stop()
        caches = {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url}}
        with override_settings(CACHES=caches), log_mode():
            started = time.monotonic()
            found = {message.id for message in checks.check_log_mode()}
            assert time.monotonic() - started < 5
    assert found == expected


def test_log_mode_check_wants_django_redis():
    locmem = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    with override_settings(CACHES=locmem), log_mode():
        assert {message.id for message in checks.check_log_mode()} == {"xaas_metering.E040"}
    with override_settings(CACHES=locmem, METERING={**settings.METERING, "WRITE_MODE": "commit"}):
        assert checks.check_log_mode() == []  # commit mode: nothing to check
