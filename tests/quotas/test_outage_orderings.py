"""The orderings an attack on the counters found (each overshot a hard limit before its fix), against a real
redis-server of the test's own and, where needed, a TCP proxy in front of Redis or PostgreSQL.

A fault is placed at an exact point of a real code path (``monkeypatch`` only decides *when* the proxy hangs or
cuts); Redis, PostgreSQL and the network between them are real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path

import pytest
import redis as redislib
from django.core.management import call_command
from django.db import Error as DatabaseError
from django.db import connection, connections, transaction
from django.db.models import Sum

from metering import counters
from metering.models import UsageRecord
from metering.usage import get_usage_units
from metering.windows import window
from quotas import handler as handler_module
from quotas.exceptions import QuotaExceeded
from quotas.handler import QuotaPolicyHandler
from quotas.models import QuotaReservation
from tenants.lineage import get_context
from tenants.models import Tenant
from tenants.tree import create_tenant, move_tenant
from tests.factories import record, tree
from tests.faults import TcpProxy
from tests.modes import FALLBACK
from tests.quota_helpers import limit
from tests.quotas.test_quota_hammer import wait_out_an_hour_boundary

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 0.3
PROJECT = Path(__file__).resolve().parent.parent.parent


def admit_until_refused(tenant: str, cap: int = 100) -> int:
    admitted = 0
    for _ in range(cap):
        try:
            QuotaPolicyHandler(tenant).consume("llm_tokens", 1)
        except QuotaExceeded:
            break
        admitted += 1
    return admitted


def past_the_cool_down() -> None:
    time.sleep(0.6)


def org_day_key(kind: str = counters.USED) -> str:
    context = get_context("org")
    day = window("day", datetime.now(UTC))
    epoch = counters.current_epoch(context.root.pk, "default")
    return counters.key(context.root.pk, context.tenant.pk, "llm_tokens", "day", day[0], kind, epoch=epoch)


def test_a_rebuild_whose_set_lands_late_never_winds_a_live_counter_back(redis_server, monkeypatch):
    """A reader's path to Redis hangs right after its GET: its rebuild's SET (a sum of then) arrives after others
    rebuilt and counted. It lands in a retired epoch (and NX keeps a newer counter)."""
    wait_out_an_hour_boundary()
    tree({"org": None, "p": "org"})
    limit("org", 10, period="day")
    first = admit_until_refused("p", cap=3)
    direct = redis_server.client()
    direct.delete(org_day_key())  # as TTL expiry or eviction would
    context = get_context("org")
    day = window("day", datetime.now(UTC))
    with TcpProxy("127.0.0.1", redis_server.port) as proxy:
        slow = redislib.Redis(host="127.0.0.1", port=proxy.port, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        holder: dict[str, object] = {}
        original = counters.client

        class HangsAfterGet:
            def get(self, *args, **kwargs):
                value = slow.get(*args, **kwargs)
                proxy.hang()
                return value

            def __getattr__(self, name):
                return getattr(slow, name)

        monkeypatch.setattr(
            counters, "client", lambda: HangsAfterGet() if threading.current_thread() is holder.get("t") else original()
        )

        def read() -> None:
            try:
                holder["value"] = get_usage_units(context, "llm_tokens", *day)
            finally:
                connections.close_all()

        reader = threading.Thread(target=read)
        holder["t"] = reader
        reader.start()
        reader.join()
        assert holder["value"] == 3_000_000  # the database answered the reader
        second = admit_until_refused("p")
        proxy.heal()  # the late SET lands now
        time.sleep(0.5)
        third = admit_until_refused("p")
    assert first + second + third == 10


@pytest.mark.commit_mode(FALLBACK)
def test_an_epoch_bump_rolled_back_in_a_callers_transaction_is_never_reused(redis_server):
    wait_out_an_hour_boundary()
    tree({"org": None, "p": "org"})
    limit("org", 10, period="day")
    root = get_context("org").root.pk
    before = counters.current_epoch(root, "default")

    class RequestFailed(Exception):
        pass

    with pytest.raises(RequestFailed), transaction.atomic():  # ATOMIC_REQUESTS, say
        redis_server.stop()
        record("p", 1)  # counters missed it: the epoch is bumped in this transaction
        redis_server.start()
        past_the_cool_down()
        QuotaPolicyHandler("p").consume("llm_tokens", 1)  # builds counters of the bumped epoch, seen only here
        raise RequestFailed()
    assert counters.current_epoch(root, "default") == before
    first = admit_until_refused("p")
    create_tenant("newcomer")
    move_tenant("newcomer", "org")  # a later committed bump
    assert first + admit_until_refused("p") == 10


def test_a_release_whose_commit_is_lost_never_gives_the_estimate_back_twice(redis_server, on_postgres, monkeypatch):
    from tests.integration.test_stores_down import database_through

    wait_out_an_hour_boundary()
    tree({"org": None, "p": "org"})
    limit("org", 10, period="day")
    settings_dict = connections["default"].settings_dict
    with (
        TcpProxy(settings_dict["HOST"] or "127.0.0.1", int(settings_dict["PORT"] or 5432)) as proxy,
        database_through(proxy),
    ):
        reservation = QuotaPolicyHandler("p").reserve("llm_tokens", 5)
        original = handler_module.ledger.decide

        def decide_then_lose_postgres(*args, **kwargs):
            result = original(*args, **kwargs)
            proxy.cut()  # right before the COMMIT
            return result

        monkeypatch.setattr(handler_module.ledger, "decide", decide_then_lose_postgres)
        with pytest.raises(DatabaseError):
            reservation.release()
        monkeypatch.setattr(handler_module.ledger, "decide", original)
        connections["default"].close()
        assert QuotaReservation.objects.get().state == QuotaReservation.State.ACTIVE
        reservation.release()  # the caller retries (or expiry gets to it)
        assert admit_until_refused("p") == 10


@pytest.mark.commit_mode(FALLBACK)
def test_a_reservation_after_a_move_during_an_outage_counts_in_the_new_tree(redis_server):
    wait_out_an_hour_boundary()
    tree({"A": None, "p": "A", "B": None, "q": "B"})
    limit("A", 100, period="day")
    limit("B", 10, period="day")
    QuotaPolicyHandler("p").check("llm_tokens", 1)  # p's lineage [A, p] cached in Redis
    redis_server.stop()
    move_tenant("p", "B")  # the lineage invalidation cannot reach Redis
    redis_server.start()  # back with p's stale lineage
    past_the_cool_down()
    assert admit_until_refused("q", 1) == 1
    reservation = QuotaPolicyHandler("p").reserve("llm_tokens", 8)
    assert reservation.handler.context.lineage_ids == ("B", "p")  # re-read under the tree lock
    admit_until_refused("q")
    reservation.commit(8)
    admit_until_refused("q")
    b = Tenant.objects.get(external_id="B")
    facts = UsageRecord.objects.filter(tenant__path__startswith=b.path).aggregate(total=Sum("units"))["total"]
    assert int(facts) <= 10_000_000


def reconcile(*args: str) -> list[str]:
    out = StringIO()
    call_command("reconcile_usage", *args, stdout=out)
    return out.getvalue().splitlines()


@pytest.mark.parametrize("kind", [counters.USED, counters.RESERVED])
def test_reconcile_reports_and_retires_a_corrupted_counter_of_either_kind(redis_server, kind):
    wait_out_an_hour_boundary()
    tree({"org": None, "p": "org"})
    limit("org", 10, period="day")
    with QuotaPolicyHandler("p").reserve("llm_tokens", 2) as reservation:
        reservation.commit(2)
    assert admit_until_refused("p", 2) == 2
    redis_server.client().set(org_day_key(kind), "-5000000")  # a bug, an operator, a lost release
    dry = reconcile("--dry-run")
    assert dry[-1] == "1 live counters found drifting from the rollups", dry
    assert "-5 ->" in "\n".join(dry)
    assert reconcile()[-1] == "1 live counters repaired drifting from the rollups"
    assert reconcile("--dry-run")[-1] == "0 live counters found drifting from the rollups"
    assert admit_until_refused("p") == 6


def quota_set_in_another_process(redis_url: str, amount: str) -> None:
    """``manage.py quota set`` in a process of its own (an operator, the admin), against the test database."""
    database = connection.settings_dict
    env = dict(os.environ, REDIS_URL=redis_url)
    if connection.vendor == "postgresql":
        env["DATABASE_URL"] = f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    else:
        pytest.skip("another process shares the test database only on PostgreSQL here")
    command = [sys.executable, "manage.py", "quota", "set", "org", "llm_tokens", amount, "--period", "day"]
    done = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.commit_mode(FALLBACK)
def test_a_limit_lowered_while_redis_is_down_binds_every_process_at_once(redis_server, on_postgres):
    wait_out_an_hour_boundary()
    tree({"org": None, "p": "org"})
    limit("org", 100, period="day")
    assert admit_until_refused("p", cap=5) == 5  # this process holds the limit of 100 in memory
    redis_server.stop()
    quota_set_in_another_process(redis_server.url, "8")
    during = admit_until_refused("p", cap=20)
    redis_server.start()  # back with its data
    past_the_cool_down()
    assert 5 + during + admit_until_refused("p", cap=20) == 8


def test_redis_restored_from_a_backup_older_than_a_limit_change_brings_no_old_limit_back(redis_server, on_postgres):
    wait_out_an_hour_boundary()
    tree({"org": None, "p": "org"})
    limit("org", 100, period="day")
    assert admit_until_refused("p", cap=5) == 5
    redis_server.stop()
    backup = redis_server.dir + "-backup"
    shutil.copytree(redis_server.dir, backup)
    redis_server.start()
    past_the_cool_down()
    quota_set_in_another_process(redis_server.url, "8")
    redis_server.stop()  # lost, and restored from the backup (or failed over to a lagging replica)
    shutil.rmtree(redis_server.dir)
    shutil.copytree(backup, redis_server.dir)
    shutil.rmtree(backup)
    redis_server.start()
    past_the_cool_down()
    assert 5 + admit_until_refused("p", cap=20) == 8
