"""Stores down, end to end: a real gunicorn server of the example project whose PostgreSQL is behind a cuttable
proxy and whose Redis is a redis-server of the test's own.

- PostgreSQL refused: every endpoint answers a JSON 503 with ``Retry-After`` within the pool's bounded wait; once
  PostgreSQL is back, requests succeed again without a restart; nothing was half-written (facts == rollups).
- PostgreSQL hung with the pool exhausted: the requests that find no connection answer 503, they do not hang.
- Redis hung: decisions go on, exact, on the database path; the first request pays about one socket timeout, the
  next ones none (the breaker); Redis resumed: used again.

The in-process half checks every enforcement point (decorator sync/async, class-based, DRF permission,
middleware routes, the API, the demo) with PostgreSQL refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from asgiref.sync import async_to_sync
from django.db import connection, connections
from django.db.models import Sum
from django.test import AsyncClient, Client

from metering.models import UsageRecord, UsageRollup
from tenants.apikeys import create_api_key
from tenants.lineage import get_context
from tenants.models import Tenant
from tests.conftest import require
from tests.factories import tree
from tests.faults import RedisServer, TcpProxy, free_port, wait_until
from tests.modes import FALLBACK
from tests.quota_helpers import limit

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent.parent
POOL_TIMEOUT = 1.5  # the server's DATABASE_POOL_TIMEOUT: the longest a request waits for a connection
REDIS_TIMEOUT = 0.5  # the example project's default socket timeouts
BREAKER_SECONDS = 3.0  # longer than the 20 requests below take, so only the first pays a timeout
TREE = {"acme": None, "acme-chat": "acme", "acme-chat-key-1": "acme-chat"}
TENANT = "acme-chat-key-1"


@pytest.fixture
def postgres() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("runs in the PostgreSQL configuration (make test runs both)")
    require("postgres")


def redis_server_binary() -> None:
    import shutil

    from tests import services

    if shutil.which("redis-server") is None:
        if services.in_ci():
            pytest.fail("redis-server is not on PATH (CI=true: the fault tests must run)")
        pytest.skip("redis-server is not on PATH")


@dataclass
class Server:
    """The example project under gunicorn, PostgreSQL through ``proxy``, Redis ``redis``."""

    proxy: TcpProxy
    redis: RedisServer
    key: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="xaas-gunicorn-", suffix=".log")[1]))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, pool_max: int = 4) -> None:
        db = connection.settings_dict
        user = quote(db["USER"] or "postgres")
        password = f":{quote(db['PASSWORD'])}" if db.get("PASSWORD") else ""
        env = {
            **{k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "METERING_ADAPTER")},
            "DATABASE_URL": f"postgres://{user}{password}@127.0.0.1:{self.proxy.port}/{db['NAME']}",
            "REDIS_URL": self.redis.url,
            "DATABASE_POOL_TIMEOUT": str(POOL_TIMEOUT),
            "DATABASE_POOL_MIN_SIZE": "1",
            "DATABASE_POOL_MAX_SIZE": str(pool_max),
            "DATABASE_CONNECT_TIMEOUT": "2",
            "REDIS_BREAKER_SECONDS": str(BREAKER_SECONDS),
            "DJANGO_SETTINGS_MODULE": "project.settings",  # the example project itself, with the knobs above
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": "test-stores-down-" + "k" * 40,
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
            "VAR_DIR": tempfile.mkdtemp(prefix="xaas-var-"),
            "PYTHONPATH": str(ROOT),
        }
        command = [sys.executable, "-m", "gunicorn", "project.wsgi:application", "--bind", f"127.0.0.1:{self.port}"]
        command += ["--workers", "1", "--threads", "8", "--timeout", "60", "--graceful-timeout", "1"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._alive() and self.demo().status_code == 200, 20, "gunicorn answering")

    def _alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{self.log.read_text()[-3000:]}")
        return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            return client.request(method, path, **kwargs)

    def demo(self, prompt: str = "one two three", path: str = "/demo/completions") -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}", "X-Tenant-ID": TENANT}
        return self.request("POST", path, json={"prompt": prompt}, headers=headers)

    def endpoints(self) -> dict[str, Callable[[], httpx.Response]]:
        bearer = {"Authorization": f"Bearer {self.key}"}
        stamp = time.monotonic_ns()
        event = {"tenant_id": TENANT, "feature_name": "llm_tokens", "quantity": "2", "transaction_id": f"tx-{stamp}"}
        return {
            "demo": lambda: self.demo(),
            "demo-async": lambda: self.demo(path="/demo/completions-async"),
            "usage": lambda: self.request("GET", "/api/v1/usage", params={"feature": "llm_tokens"}, headers=bearer),
            "events": lambda: self.request("POST", "/api/v1/events", json=event, headers=bearer),
            "entitlements": lambda: self.request(
                "GET", "/api/v1/entitlements", params={"tenant_id": TENANT, "feature": "llm_tokens"}, headers=bearer
            ),
        }


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def all_at_once(calls: dict[str, Callable[[], httpx.Response]]) -> dict[str, tuple[httpx.Response, float]]:
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(timed, call) for name, call in calls.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {
        "error": {"code": "service_unavailable", "field": None, "message": "a data store is unavailable; retry later"}
    }
    assert int(response.headers["Retry-After"]) > 0


def assert_facts_match_rollups() -> None:
    """Nothing half-written: at every level, the rollups sum exactly the facts of its subtree."""
    for tenant in Tenant.objects.all():
        subtree = Tenant.objects.filter(path__startswith=tenant.path)
        fact_units = UsageRecord.objects.filter(tenant__in=subtree).aggregate(s=Sum("units"))["s"] or 0
        rollup_units = UsageRollup.objects.filter(tenant=tenant).aggregate(s=Sum("units"))["s"] or 0
        assert fact_units == rollup_units, f"{tenant.external_id}: facts {fact_units} != rollups {rollup_units}"
        assert fact_units > 0 or tenant.external_id not in TREE


@pytest.fixture
def server(postgres: None) -> Iterator[Server]:
    redis_server_binary()
    tree(TREE)
    limit("acme-chat", 30, period="day")  # demo prompts of 3 words: 10 admitted
    _, key = create_api_key("acme-chat", name="faults")
    host, port = connection.settings_dict["HOST"] or "127.0.0.1", int(connection.settings_dict["PORT"] or 5432)
    with RedisServer() as redis, TcpProxy(host, port) as proxy:
        started = Server(proxy=proxy, redis=redis, key=key)
        try:
            started.start()
            yield started
        finally:
            started.stop()
            proxy.heal()
    log = started.log.read_text()
    started.log.unlink()
    assert "Traceback" not in log, log[-3000:]
    assert "postgres://" not in log and "password" not in log.lower()


def test_postgres_refused_every_endpoint_answers_503_then_recovers_without_a_restart(server):
    healthy = all_at_once(server.endpoints())
    assert {name: r.status_code for name, (r, _) in healthy.items()} == {
        "demo": 200,
        "demo-async": 200,
        "usage": 200,
        "events": 201,
        "entitlements": 200,
    }

    server.proxy.refuse()
    started = time.monotonic()
    down = all_at_once(server.endpoints())
    for name, (response, elapsed) in down.items():
        assert_503(response)
        assert elapsed < POOL_TIMEOUT + 3, f"{name} took {elapsed:.2f} s"
    assert time.monotonic() - started < POOL_TIMEOUT + 3.5

    server.proxy.heal()
    healed = time.monotonic()
    wait_until(lambda: server.demo().status_code == 200, 20, "a 200 after PostgreSQL came back")
    recovered = time.monotonic() - healed
    back = all_at_once(server.endpoints())
    assert {r.status_code for r, _ in back.values()} <= {200, 201, 429}, {n: r.text for n, (r, _) in back.items()}
    print(f"PostgreSQL refused: 503 in {max(e for _, e in down.values()):.2f} s; recovered in {recovered:.2f} s")
    assert_facts_match_rollups()


def test_postgres_hung_with_the_pool_exhausted_answers_503_not_a_hang(server):
    server.stop()
    server.start(pool_max=2)
    server.proxy.hang()
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(timed, server.demo) for _ in range(6)]
        time.sleep(POOL_TIMEOUT + 2.5)
        answered = [future.result() for future in futures if future.done()]
        server.proxy.heal()
        late = [future.result() for future in futures if future not in answered]
    # At most the pool's two connections wait on the hung server; every other request is answered 503 in time.
    assert len(answered) >= 4
    for response, elapsed in answered:
        assert_503(response)
        assert elapsed < POOL_TIMEOUT + 2.5
    for response, _ in late:
        assert response.status_code in (200, 503), response.text[:300]
        assert response.headers["content-type"].startswith("application/json")
    wait_until(lambda: server.demo().status_code == 200, 20, "a 200 after PostgreSQL answered again")
    print(f"PostgreSQL hung, pool of 2: {len(answered)} of 6 answered 503 within {max(e for _, e in answered):.2f} s")
    assert_facts_match_rollups()


@pytest.mark.commit_mode(FALLBACK)
def test_redis_hung_decisions_go_on_exact_and_fast_on_the_database(server):
    stats = server.redis.client()
    assert server.demo().status_code == 200  # 3 of 30 tokens, decided in Redis
    assert server.demo().status_code == 200
    before_outage = UsageRecord.objects.count()  # the server's readiness probe recorded one too
    server.redis.pause()
    results = []
    started = time.monotonic()
    for _ in range(20):
        results.append(timed(server.demo))
    total = time.monotonic() - started
    first = results[0][1]
    statuses = [response.status_code for response, _ in results]
    assert set(statuses) <= {200, 429}, [r.text for r, _ in results]
    assert statuses.count(200) == 10 - before_outage  # 10 prompts of 3 tokens = the limit of 30, never more
    assert first < REDIS_TIMEOUT * 3 + 0.5, f"first request with Redis hung: {first:.2f} s"
    assert total < 3, f"20 requests with Redis hung took {total:.2f} s"
    assert sum(elapsed > REDIS_TIMEOUT for _, elapsed in results) <= 1 + int(total // BREAKER_SECONDS)
    server.redis.resume()
    time.sleep(BREAKER_SECONDS + 0.1)
    before = int(stats.info("stats")["total_commands_processed"])
    response = server.demo()
    assert response.status_code == 429  # the outage's usage is not forgotten
    assert int(stats.info("stats")["total_commands_processed"]) > before + 1  # Redis is used again
    print(f"Redis hung: first request {first:.2f} s, 20 requests {total:.2f} s:", [round(e, 3) for _, e in results])
    stats.close()
    assert_facts_match_rollups()


# ---- in process: every enforcement point, PostgreSQL refused ----


@contextmanager
def database_through(proxy: TcpProxy) -> Iterator[None]:
    """This process's default connection goes through ``proxy`` (no pool: a refused connection fails at once)."""
    conn = connections["default"]
    saved = dict(conn.settings_dict)
    conn.close()
    conn.close_pool()  # type: ignore[attr-defined]
    conn.settings_dict.update(HOST="127.0.0.1", PORT=proxy.port)
    conn.settings_dict["OPTIONS"] = {k: v for k, v in saved["OPTIONS"].items() if k != "pool"}
    try:
        yield
    finally:
        conn.close()
        conn.settings_dict.clear()
        conn.settings_dict.update(saved)


@pytest.fixture
def refused(postgres: None, settings) -> Iterator[dict[str, str]]:
    from tests.identity_helpers import TRUSTED_HEADER
    from tests.quotas.test_quota_http import ROUTES

    tree(TREE)
    _, key = create_api_key("acme-chat", name="faults")
    settings.ROOT_URLCONF = "tests.quota_urls"
    settings.METERING = {"QUOTA_ROUTES": ROUTES, **TRUSTED_HEADER}
    host, port = connection.settings_dict["HOST"] or "127.0.0.1", int(connection.settings_dict["PORT"] or 5432)
    with TcpProxy(host, port) as proxy, database_through(proxy):
        get_context(TENANT)  # the lineage is cached: the request reaches the enforcement point, which needs the DB
        proxy.refuse()
        yield {"key": key}


ENFORCEMENT_POINTS = ["/sync", "/class", "/drf-decorated", "/drf-permission", "/routed/by-name", "/metered/anything"]


def test_every_enforcement_point_answers_503_when_postgres_is_refused(refused, caplog):
    headers = {"X-Tenant-ID": TENANT}
    for path in ENFORCEMENT_POINTS:
        caplog.clear()
        with caplog.at_level("WARNING", logger="tenants.unavailable"):
            assert_django_503(Client().get(path, headers=headers), path)
        assert "quota decision on 'api_calls': OperationalError" in caplog.text, (path, caplog.text)
        assert "127.0.0.1" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tenants.unavailable"):  # an uncached tenant: the middleware's lookup
        assert_django_503(Client().get("/sync", headers={"X-Tenant-ID": "acme"}), "uncached tenant")
    assert "tenant resolution: OperationalError" in caplog.text


def test_api_and_demo_answer_503_when_postgres_is_refused(refused, settings):
    settings.ROOT_URLCONF = "project.urls"
    bearer = {"Authorization": f"Bearer {refused['key']}"}
    assert_django_503(Client().get("/api/v1/usage?feature=llm_tokens", headers=bearer), "usage")
    assert_django_503(Client().post("/api/v1/events", {}, content_type="application/json", headers=bearer), "ev")
    demo = {"X-Tenant-ID": TENANT}
    body = '{"prompt": "a b"}'
    assert_django_503(Client().post("/demo/completions", body, content_type="application/json", headers=demo), "d")


def test_async_paths_answer_503_when_postgres_is_refused(refused, settings):
    headers = {"X-Tenant-ID": TENANT}
    assert_django_503(async_to_sync(AsyncClient().get)("/async", headers=headers), "/async")
    assert_django_503(async_to_sync(AsyncClient().get)("/async", headers={"X-Tenant-ID": "acme"}), "async middleware")
    settings.ROOT_URLCONF = "project.urls"
    post = async_to_sync(AsyncClient().post)
    response = post("/demo/completions-async", '{"prompt": "a"}', content_type="application/json", headers=headers)
    assert_django_503(response, "demo-async")


def assert_django_503(response, what: str) -> None:
    assert response.status_code == 503, (what, response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json"), what
    assert response.json()["error"]["code"] == "service_unavailable", what
    assert int(response["Retry-After"]) > 0, what
