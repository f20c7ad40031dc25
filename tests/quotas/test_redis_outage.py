"""Quotas stay exact through Redis outages, against a real redis-server of the test's own (``tests.faults``).

Threads hammer one organization through two projects while the test stops Redis (and starts it again with its
data, from the AOF), hangs it (SIGSTOP/SIGCONT) or flushes it, part-way. Each run must end with admitted == the
limit, never more, and the facts, the rollups and the live counters telling the same total.

The outage case is the one that overshot before counter epochs: decisions during the outage were taken on the
database, Redis came back with counters that lacked them, and a hard 240/day admitted 300+.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import connections
from django.db.models import Sum

from metering import counters
from metering.models import UsageRecord
from metering.usage import _units_from_database, get_usage_units
from metering.windows import window
from quotas.exceptions import QuotaExceeded
from quotas.handler import QuotaPolicyHandler
from tenants.lineage import get_context
from tests.factories import tree
from tests.modes import FALLBACK
from tests.quota_helpers import limit
from tests.quotas.test_quota_hammer import wait_out_an_hour_boundary

pytestmark = pytest.mark.django_db(transaction=True)

ORG_LIMIT, P1_LIMIT = 240, 150  # org per day; p1 per hour (binds before the org does for p1's keys)
THREADS, REQUESTS = 6, 70  # 420 requests for 240 admissions
TIMEOUT = 0.3  # Redis socket timeouts of the configuration under test
SLOW_REQUEST = 3.0  # no request may wait longer than this, whatever Redis does


class Hammer:
    """Threads consuming 1 unit per request at random keys of two projects; counts what was admitted."""

    def __init__(self) -> None:
        self.admitted = {"p1": 0, "p2": 0}
        self.slowest = 0.0
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.pending: list[tuple[int, Callable[[], None]]] = []
        self.fault_lock = threading.Lock()

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.admitted.values())

    def maybe_fault(self) -> None:
        """Run the next fault once its threshold is reached; the workers that arrive meanwhile wait for it."""
        if self.pending and self.total >= self.pending[0][0]:
            with self.fault_lock:
                if self.pending and self.total >= self.pending[0][0]:
                    self.pending.pop(0)[1]()

    def worker(self, seed: int) -> None:
        try:
            for index in range(REQUESTS):
                self.maybe_fault()
                project = "p1" if (index + seed) % 2 == 0 else "p2"
                key = f"{project}-k{1 + (index // 2 + seed) % 2}"
                started = time.monotonic()
                try:
                    QuotaPolicyHandler(key).consume("llm_tokens", 1)
                    admitted = True
                except QuotaExceeded:
                    admitted = False
                elapsed = time.monotonic() - started
                with self.lock:
                    self.slowest = max(self.slowest, elapsed)
                    if admitted:
                        self.admitted[project] += 1
                time.sleep(0.002)
        except BaseException as error:  # reported by the test, not lost in a thread
            self.errors.append(error)
        finally:
            connections.close_all()

    def run(self, faults: list[tuple[int, Callable[[], None]]]) -> None:
        """Start the threads; run each fault once ``total`` admissions reached its threshold."""
        self.pending = list(faults)
        threads = [threading.Thread(target=self.worker, args=(seed,)) for seed in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not self.errors, self.errors
        assert not self.pending, f"the hammer ended before every fault ran ({self.total} admitted)"


def build_tree() -> None:
    wait_out_an_hour_boundary()
    tree({"org": None, "p1": "org", "p2": "org", "p1-k1": "p1", "p1-k2": "p1", "p2-k1": "p2", "p2-k2": "p2"})
    limit("org", ORG_LIMIT, period="day")
    limit("p1", P1_LIMIT, period="hour")


def assert_exact(hammer: Hammer) -> None:
    """admitted == the limit; facts == rollups == live counters at every level; reconcile finds nothing."""
    assert hammer.total == ORG_LIMIT, hammer.admitted
    assert hammer.admitted["p1"] <= P1_LIMIT, hammer.admitted
    now = datetime.now(UTC)
    day = window("day", now)
    for tenant_id, admitted in (("org", hammer.total), ("p1", hammer.admitted["p1"]), ("p2", hammer.admitted["p2"])):
        context = get_context(tenant_id)
        facts = UsageRecord.objects.filter(tenant__path__startswith=context.path).aggregate(total=Sum("units"))
        assert int(facts["total"]) == admitted * 1_000_000, tenant_id
        assert _units_from_database(context, "llm_tokens", *day) == admitted * 1_000_000, tenant_id
        redis = counters.client()
        assert redis is not None
        epoch = counters.current_epoch(context.root.pk, "default")
        assert get_usage_units(context, "llm_tokens", *day) == admitted * 1_000_000, tenant_id
        live = redis.get(counters.key(context.root.pk, context.tenant.pk, "llm_tokens", "day", day[0], epoch=epoch))
        assert live is not None and int(live) == admitted * 1_000_000, tenant_id
    from io import StringIO

    out = StringIO()
    call_command("reconcile_usage", "--dry-run", stdout=out)
    assert out.getvalue().splitlines()[-2:] == [
        "0 differences found in 1 trees",
        "0 live counters found drifting from the rollups",
    ]


@pytest.mark.commit_mode(FALLBACK)
def test_redis_stopped_mid_run_and_restarted_with_its_data(redis_server):
    build_tree()
    hammer = Hammer()
    epoch_before = None

    def stop() -> None:
        nonlocal epoch_before
        epoch_before = counters.current_epoch(get_context("org").root.pk, "default")
        redis_server.stop()  # AOF flushed: it comes back with the counters of before the outage

    hammer.run([(60, stop), (140, redis_server.start)])
    assert redis_server.client().dbsize() > 0  # it did come back with data
    # The outage's decisions were taken on the database, and retired the counters Redis came back with.
    assert counters.current_epoch(get_context("org").root.pk, "default") != epoch_before
    assert hammer.slowest < SLOW_REQUEST
    assert_exact(hammer)


@pytest.mark.commit_mode(FALLBACK)
def test_redis_hung_mid_run_costs_one_timeout_per_cool_down_not_per_call(redis_server):
    build_tree()
    hammer = Hammer()
    hung_at: list[float] = []

    def hang() -> None:
        hung_at.append(time.monotonic())
        redis_server.pause()

    hammer.run([(60, hang), (140, redis_server.resume)])
    assert hammer.slowest < SLOW_REQUEST, hammer.slowest
    assert_exact(hammer)


def test_redis_flushed_mid_run(redis_server):
    build_tree()
    hammer = Hammer()
    hammer.run([(60, redis_server.flushall), (120, redis_server.flushall), (180, redis_server.flushall)])
    assert_exact(hammer)


@pytest.mark.commit_mode(FALLBACK)
def test_a_restart_with_old_data_never_serves_a_stale_usage_read(redis_server):
    """The read path too: usage served from a counter of before the outage would miss the outage's facts."""
    from tests.factories import record

    build_tree()
    record("p1-k1", 5)
    day = window("day", datetime.now(UTC))
    assert get_usage_units(get_context("org"), "llm_tokens", *day) == 5_000_000  # counter built in Redis
    redis_server.stop()
    record("p1-k1", 2)  # Redis down: stored, counted in the rollups, not in Redis
    redis_server.start()  # back with the counter at 5
    assert get_usage_units(get_context("org"), "llm_tokens", *day) == 7_000_000
    assert Decimal(get_usage_units(get_context("p1"), "llm_tokens", None, None)) == 7_000_000
