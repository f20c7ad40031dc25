"""Limit and tenant changes made by one OS process reach another's next decision, whatever the cache.

Process A keeps deciding (a ``tests.site_worker`` that stays alive, caches warm); process B changes the limit with
``quota set``, toggles exempt, deactivates and reactivates a level, moves a tenant. On the embedded default (a SQLite
file and LocMemCache, a cache no other process sees), on a shared Redis cache, and in log mode (A's lineage and
epoch live in its memory, validated by its one script call per decision).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import services
from tests.conftest import require
from tests.faults import RedisServer
from tests.metering.test_redis_namespace import Site, migrate, site_env


@pytest.fixture(params=["locmem", "redis", "redis-log"])
def two_processes(request, tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    redis_url = None
    with contextlib.ExitStack() as stack:
        if request.param == "redis":
            require("redis")
            redis_url = services.url("redis")
        elif request.param == "redis-log":
            # Log mode needs AOF (system check xaas_metering.E041): a redis-server of the test's own.
            redis_url = stack.enter_context(RedisServer(appendonly=True)).url
        env = site_env(tmp_path, "site", None, redis_url)  # one SQLite file for both processes
        if request.param == "redis-log":
            env["METERING_WRITE_MODE"] = "log"  # the decider's lineage and epoch are cached, validated by the script
        migrate(env)
        changer, decider = Site(env), Site(env)
        try:
            yield decider, changer
        finally:
            decider.close()
            changer.close()


def consume(site: Site, tenant_id: str = "k1") -> dict:
    return site.ask("consume", tenant_id, "calls", 1)


def test_the_next_decision_sees_each_change_of_another_process(two_processes):
    decider, changer = two_processes
    changer.ask("seed", 3)
    assert [consume(decider)["allowed"] for _ in range(4)] == [True, True, True, False]

    changer.ask("quota-set", "org", "calls", 5)  # raised: the very next decision admits
    assert [consume(decider)["allowed"] for _ in range(3)] == [True, True, False]
    changer.ask("quota-set", "org", "calls", 4)  # lowered below the usage: the next check refuses
    refused = decider.ask("check", "k1", "calls", 0)
    assert refused == {"allowed": False, "error": "quota_exceeded", "tenant_id": "org", "limit": "4"}

    changer.ask("exempt", "org", 1)  # zero-cap: counted, never blocked
    allowed = consume(decider)
    assert allowed["allowed"] and allowed["exempt"] and allowed["hard"] == [False]
    changer.ask("exempt", "org", 0)
    assert consume(decider)["error"] == "quota_exceeded"

    changer.ask("quota-set", "org", "calls", 100)
    assert consume(decider)["allowed"]
    changer.ask("deactivate", "p1")  # an ancestor: its whole subtree stops at once
    assert consume(decider) == {"allowed": False, "error": "inactive"}
    assert consume(decider, "k2") == {"allowed": False, "error": "inactive"}
    changer.ask("activate", "p1")
    assert consume(decider)["allowed"]

    changer.ask("move", "k1", "p2")
    moved = consume(decider)
    assert moved["allowed"] and moved["lineage"] == ["org", "p2", "k1"]
    changer.ask("deactivate", "p2")  # the new parent: A must act on the lineage after the move
    assert consume(decider) == {"allowed": False, "error": "inactive"}
    assert consume(decider, "k2")["allowed"]  # still under the active p1

    audit = changer.ask("audit", "org", "org", "calls") if changer.env.get("REDIS_URL") else None
    if audit is not None:
        assert audit["facts"] == audit["rollups"] == audit["counter"]
        assert audit["drift"] == []
