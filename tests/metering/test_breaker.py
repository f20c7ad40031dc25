"""metering.breaker against a real redis-server of the test's own: a hung or stopped Redis costs one timeout per
cool-down for the whole process, every use of that Redis fails fast meanwhile, and it closes once Redis answers."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.core.cache import caches
from django.core.checks import run_checks
from django.test import override_settings

from metering.breaker import (
    BreakerConnection,
    BreakerConnectionPool,
    CircuitBreaker,
    RedisUnavailable,
    breaker_for,
    reset_all,
)
from tests import faults
from tests.faults import RedisServer
from tests.modes import FALLBACK

TIMEOUT = 0.3
COOLDOWN = 1.0


def require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        from tests import services

        if services.in_ci():
            pytest.fail("redis-server is not on PATH (CI=true: the fault tests must run)")
        pytest.skip("redis-server is not on PATH")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    require_redis_server()
    reset_all()
    with RedisServer() as started:
        yield started
    reset_all()


def client_of(server: RedisServer, cooldown: float = COOLDOWN) -> redis.Redis:
    pool = BreakerConnectionPool.from_url(
        server.url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, breaker_cooldown=cooldown
    )
    return redis.Redis(connection_pool=pool)


def timed(call) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        call()
    except (redis.ConnectionError, redis.TimeoutError) as error:
        return time.monotonic() - started, error
    return time.monotonic() - started, None


def test_a_hung_redis_costs_one_timeout_then_fails_fast_until_the_cooldown(server):
    client = client_of(server)
    assert client.set("k", "v")
    server.pause()
    elapsed, error = timed(lambda: client.get("k"))
    assert isinstance(error, redis.TimeoutError) and TIMEOUT * 0.8 < elapsed < TIMEOUT + 0.5
    started = time.monotonic()
    for _ in range(200):
        elapsed, error = timed(lambda: client.get("k"))
        assert isinstance(error, RedisUnavailable)
        assert isinstance(error, redis.ConnectionError)  # what every existing fallback catches
    assert time.monotonic() - started < 0.2  # 200 calls, no network
    time.sleep(COOLDOWN + 0.05)
    elapsed, error = timed(lambda: client.get("k"))  # the probe: still hung, one more timeout
    assert isinstance(error, redis.TimeoutError) and elapsed > TIMEOUT * 0.8
    assert isinstance(timed(lambda: client.get("k"))[1], RedisUnavailable)
    server.resume()
    assert isinstance(timed(lambda: client.get("k"))[1], RedisUnavailable)  # open until its cool-down ends
    time.sleep(COOLDOWN + 0.05)
    assert client.get("k") == b"v"
    assert not breaker_for("127.0.0.1", server.port, COOLDOWN).is_open
    assert [client.incr("n") for _ in range(3)] == [1, 2, 3]


def test_a_stopped_redis_fails_fast_and_is_used_again_once_back(server):
    client = client_of(server)
    client.set("k", "v")
    server.stop()
    assert isinstance(timed(lambda: client.get("k"))[1], redis.ConnectionError)
    elapsed, error = timed(lambda: client.get("k"))
    assert isinstance(error, RedisUnavailable) and elapsed < 0.01
    server.start()  # no AOF: back empty
    time.sleep(COOLDOWN + 0.05)
    assert client.get("k") is None
    assert client.set("k", "w") and client.get("k") == b"w"


def test_one_breaker_per_server_shared_by_every_pool_of_the_process(server):
    first, second = client_of(server), client_of(server)
    server.pause()
    assert isinstance(timed(lambda: first.get("k"))[1], redis.TimeoutError)
    elapsed, error = timed(lambda: second.ping())  # another pool, never used before: fails without trying
    assert isinstance(error, RedisUnavailable) and elapsed < 0.01
    server.resume()


def test_while_one_thread_probes_the_others_fail_fast(server):
    client = client_of(server)
    client.ping()
    server.pause()
    timed(lambda: client.ping())
    time.sleep(COOLDOWN + 0.05)
    probe_done = threading.Event()

    def probing() -> None:
        timed(lambda: client.ping())
        probe_done.set()

    probe = threading.Thread(target=probing)
    probe.start()
    time.sleep(0.05)  # the probe is waiting on the hung server
    results = []
    for _ in range(8):
        worker = threading.Thread(target=lambda: results.append(timed(lambda: client.ping())))
        worker.start()
        worker.join()
    assert not probe_done.is_set()
    assert all(isinstance(error, RedisUnavailable) and elapsed < 0.01 for elapsed, error in results)
    probe.join()
    server.resume()


def test_an_error_reply_is_an_answer_not_a_failure(server):
    client = client_of(server)
    client.set("text", "abc")
    with pytest.raises(redis.ResponseError):
        client.incr("text")
    assert not breaker_for("127.0.0.1", server.port, COOLDOWN).is_open


def test_breaker_states_with_a_clock():
    now = [100.0]
    breaker = CircuitBreaker("test:1", cooldown=5, clock=lambda: now[0])
    breaker.before_call()
    breaker.record_failure(redis.TimeoutError())
    assert breaker.is_open and breaker.trips == 1
    with pytest.raises(RedisUnavailable, match=r"test:1 .*5\.0 s more"):
        breaker.before_call()
    now[0] += 4.9
    with pytest.raises(RedisUnavailable):
        breaker.before_call()
    now[0] += 0.1
    breaker.before_call()  # this thread probes
    breaker.before_call()  # and its nested calls go through
    other: list[BaseException] = []
    thread = threading.Thread(target=lambda: _collect(breaker.before_call, other))
    thread.start()
    thread.join()
    assert isinstance(other[0], RedisUnavailable)  # another thread, during the probe
    breaker.record_success()
    assert not breaker.is_open
    thread = threading.Thread(target=lambda: _collect(breaker.before_call, other))
    thread.start()
    thread.join()
    assert len(other) == 1
    with pytest.raises(ValueError, match="breaker_cooldown"):
        CircuitBreaker("x", cooldown=0)


def _collect(call, errors: list[BaseException]) -> None:
    try:
        call()
    except RedisUnavailable as error:
        errors.append(error)


def test_the_pool_refuses_a_connection_class_it_cannot_guard():
    with pytest.raises(TypeError, match="UnixDomainSocketConnection"):
        BreakerConnectionPool(connection_class=redis.UnixDomainSocketConnection)
    assert BreakerConnectionPool().connection_class is BreakerConnection


def breaker_cache(server: RedisServer) -> dict:
    return faults.breaker_cache(server.url, timeout=TIMEOUT, cooldown=COOLDOWN)


def test_the_django_cache_api_and_the_counters_client_share_the_breaker(server):
    from django_redis import get_redis_connection
    from django_redis.exceptions import ConnectionInterrupted

    from metering import counters

    with override_settings(CACHES=breaker_cache(server)):
        caches["default"].set("x", 1)
        server.pause()
        elapsed, _ = timed(lambda: caches["default"].get("x"))
        assert elapsed < TIMEOUT + 0.5
        started = time.monotonic()
        for _ in range(50):
            with pytest.raises((ConnectionInterrupted, RedisUnavailable)):  # as django-redis passes it on
                caches["default"].get("x")
            with pytest.raises(RedisUnavailable):
                get_redis_connection("default").get("x")
            with pytest.raises(RedisUnavailable):
                counters.client().ping()
        assert time.monotonic() - started < 0.5
        server.resume()
        time.sleep(COOLDOWN + 0.05)
        assert caches["default"].get("x") == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.commit_mode(FALLBACK)
def test_a_hung_redis_leaves_decisions_exact_and_fast_on_the_database(server):
    """The whole decision path (lineage cache, rules token, counters) with a hung Redis: one timeout, then the
    database decides, exactly (a hard limit of 5 admits 5 of 20)."""
    from quotas.exceptions import QuotaExceeded
    from quotas.handler import QuotaPolicyHandler
    from tests.factories import tree, usage
    from tests.quota_helpers import limit

    with override_settings(CACHES=breaker_cache(server)):
        tree({"org": None, "p": "org", "k": "p"})
        limit("p", 5, feature="api_calls", period="day")
        QuotaPolicyHandler("k").consume("api_calls", 1)  # warm: counters and rules in Redis
        server.pause()
        started = time.monotonic()
        admitted = 0
        for _ in range(20):
            try:
                QuotaPolicyHandler("k").consume("api_calls", 1)
                admitted += 1
            except QuotaExceeded:
                pass
        elapsed = time.monotonic() - started
        server.resume()
    assert admitted == 4  # 1 before + 4 = the limit
    assert usage("org", "api_calls") == 5
    assert elapsed < TIMEOUT * 3 + 1.5, f"20 decisions took {elapsed:.2f} s with Redis hung"


def test_checks_warn_of_a_redis_cache_without_timeouts_or_breaker():
    def ids(options: dict) -> set[str]:
        config: dict[str, dict[str, Any]] = {
            "default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"}
        }
        config["default"]["OPTIONS"] = options
        with override_settings(CACHES=config):
            return {m.id for m in run_checks() if m.id in ("xaas_metering.W020", "xaas_metering.W021")}

    assert ids({}) == {"xaas_metering.W020", "xaas_metering.W021"}
    assert ids({"SOCKET_TIMEOUT": 0.5}) == {"xaas_metering.W020", "xaas_metering.W021"}
    guarded = {"SOCKET_TIMEOUT": 0.5, "SOCKET_CONNECT_TIMEOUT": 0.5}
    assert ids({**guarded, "CONNECTION_POOL_CLASS": "metering.breaker.BreakerConnectionPool"}) == set()
    assert ids({**guarded, "CONNECTION_POOL_KWARGS": {"connection_class": BreakerConnection}}) == set()
    assert ids({**guarded, "CONNECTION_POOL_CLASS": "nowhere.Pool"}) == {"xaas_metering.W021"}
    with override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}):
        assert not {m.id for m in run_checks()} & {"xaas_metering.W020", "xaas_metering.W021"}
