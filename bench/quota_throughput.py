"""Benchmark: requests/s of the quota enforcement points against a bare view and against django-ratelimit.

Usage (PostgreSQL and Redis required; the database is created if missing, then migrated)::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench REDIS_URL=redis://127.0.0.1:6379/12 \
        .venv/bin/python bench/quota_throughput.py [--rounds 5] [--requests 300] [--warmup 50] [--profile 300] \
        [--write-mode commit|log]

``--write-mode log`` (``METERING_WRITE_MODE=log``): the enforcement points append to the tree's Redis stream in one
script call instead of committing a fact (README "Write modes"); the stream is drained after the timed part, untimed,
and the facts persisted are reported. Results then go to ``bench/results/quota_throughput_log.json``.

Requests are driven in-process and sequentially by one ``django.test.Client`` (no server, no network between
client and Django; PostgreSQL and Redis are real), acting for ``qbench-key`` through an API key (the default
identity; ``--trusted-header``: ``X-Tenant-ID`` with ``header_resolver``), a key tenant in the lineage
``qbench-org`` -> ``qbench-proj`` -> ``qbench-key``. Each of ``--rounds`` rounds runs ``--requests`` requests of
every variant, one variant after another (the order rotates each round), so drift on a noisy machine hits every
variant alike. Variants (views in ``bench/bench_urls.py``):

- ``bare``: a sync view doing what the demo does minus metering and quotas (parse the JSON prompt, echo its words,
  answer ``{"text", "tokens"}``): the baseline;
- ``bare_async``: the same as an ``async def`` view, like the demo's: the cost of async dispatch under WSGI alone;
- ``demo``: the real ``POST /demo/completions`` (``project.demo.completions``, a sync view): reserve the prompt's
  word count of ``llm_tokens`` at all three levels (hard monthly ``QuotaLimit`` of 10**12 at each), run the fake
  model, commit the actual count as a durable fact in PostgreSQL, with the Redis counters on;
- ``demo_async``: ``POST /demo/completions-async``, the same through the brief's async service (``async def`` view,
  ``areserve`` / ``acommit``): what the async dispatch costs under WSGI on top of ``demo``;
- ``enforce_quota``: ``@enforce_quota("api_calls")`` on the bare view (consume: one fact per request; hard monthly
  ``api_calls`` limits of 10**12 at all three levels too);
- ``ratelimit``: django-ratelimit on the bare view (``key="header:x-tenant-id"``, ``rate="1000000/m"``), counting in
  the same Redis through the django-redis cache.

Reported: median requests/s per variant over the rounds and the cost multiple ``bare / variant``; per request, the
SQL queries (``CaptureQueriesContext``), transactions, Redis commands sent by this process, and Redis commands run by
the server (``INFO commandstats`` delta, which includes the commands inside Lua scripts, and any other client's
traffic meanwhile); the wall time of a demo and an ``@enforce_quota`` request split by phase (resolve the tenant,
reserve, commit, consume; SQL / Redis / Python inside each, measured with light wrappers, no profiler); then a
profile of ``--profile`` demo requests (cProfile, and pyinstrument when installed).
Results: a table on stdout, ``bench/results/quota_throughput.json``, and the profiles next to it.

Nothing is flushed: the tenants and limits are created once and reused; every run adds its facts to them.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import importlib.metadata
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULTS_PATH = RESULTS_DIR / "quota_throughput.json"
PROFILE_TEXT_PATH = RESULTS_DIR / "quota_throughput_profile.txt"
PROFILE_HTML_PATH = RESULTS_DIR / "quota_throughput_profile.html"
CPROFILE_PATH = RESULTS_DIR / "quota_throughput.pstats"

ORG_ID, PROJECT_ID, KEY_ID = "qbench-org", "qbench-proj", "qbench-key"
LIMIT = Decimal(10**12)
LIMITED_FEATURES = ("llm_tokens", "api_calls")
PROMPT = "measure how much the quota enforcement costs per request compared with a bare view"
BODY = json.dumps({"prompt": PROMPT})
EXAMPLE_COMMAND = (
    "DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench REDIS_URL=redis://127.0.0.1:6379/12 "
    ".venv/bin/python bench/quota_throughput.py"
)


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    path: str
    description: str


VARIANTS = [
    Variant("bare", "(a) bare", "/bench/bare", "sync view: parse JSON prompt, echo words; no metering/quotas"),
    Variant("bare_async", "(a') bare async", "/bench/bare-async", "the bare view as async def (like the demo)"),
    Variant(
        "demo",
        "(b) demo enforced",
        "/demo/completions",
        "project.demo.completions: reserve llm_tokens at 3 levels, echo, commit a durable fact",
    ),
    Variant(
        "demo_async",
        '(b") demo async',
        "/demo/completions-async",
        "project.demo.completions_async: the demo through the async service (areserve, acommit)",
    ),
    Variant(
        "enforce_quota",
        "(b') @enforce_quota",
        "/bench/enforce-quota",
        '@enforce_quota("api_calls") on the bare view: consume, one fact per request, 3 hard limits',
    ),
    Variant(
        "ratelimit",
        "(d) django-ratelimit",
        "/bench/ratelimit",
        'django_ratelimit @ratelimit(key="header:x-tenant-id", rate="1000000/m", method="POST") via django-redis',
    ),
]
BY_NAME = {variant.name: variant for variant in VARIANTS}
COUNTED = ["demo", "demo_async", "enforce_quota", "ratelimit", "bare"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--requests", type=int, default=300, help="requests per variant per round (default 300)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests per variant first (default 50)")
    parser.add_argument("--count-requests", type=int, default=50, help="requests per variant counted (default 50)")
    parser.add_argument("--profile", type=int, default=300, help="demo requests profiled (default 300; 0: none)")
    parser.add_argument(
        "--trusted-header",
        action="store_true",
        help="act through X-Tenant-ID alone (header_resolver + TRUST_TENANT_HEADER, a gateway you control) instead "
        "of the default: an API key of the key tenant (Authorization: Bearer, one key lookup per request)",
    )
    parser.add_argument(
        "--write-mode",
        choices=["commit", "log"],
        default=os.environ.get("METERING_WRITE_MODE", "commit"),
        help='METERING["WRITE_MODE"] (default: $METERING_WRITE_MODE or commit)',
    )
    args = parser.parse_args()
    os.environ["METERING_WRITE_MODE"] = args.write_mode  # read by project.settings at setup
    if args.rounds < 1 or args.requests < 1 or args.warmup < 0 or args.count_requests < 1 or args.profile < 0:
        parser.error("--rounds, --requests and --count-requests must be positive; --warmup, --profile >= 0")
    return args


# --- setup --------------------------------------------------------------------------------------------------------


def setup_django() -> None:
    missing = [name for name in ("DATABASE_URL", "REDIS_URL") if not os.environ.get(name)]
    if missing:
        sys.exit(
            f"bench/quota_throughput.py needs {' and '.join(missing)} (PostgreSQL and Redis are what is measured), "
            f"e.g.\n  {EXAMPLE_COMMAND}"
        )
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    # DEBUG would keep every query in connection.queries: measure like production unless told otherwise.
    os.environ.setdefault("DJANGO_DEBUG", "0")
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-" + "k" * 40)
    sys.path.insert(0, str(REPO_ROOT))
    import django
    from django.conf import settings

    engine = settings.DATABASES["default"]["ENGINE"]
    if "postgresql" not in engine:
        sys.exit(f"DATABASE_URL must name a PostgreSQL database (got engine {engine!r}), e.g.\n  {EXAMPLE_COMMAND}")
    backend = settings.CACHES["default"]["BACKEND"]
    if backend != "django_redis.cache.RedisCache":
        sys.exit(f"the default cache must be django-redis (got {backend!r}); set REDIS_URL")
    django.setup()
    from django.test.utils import override_settings

    override_settings(ROOT_URLCONF="bench.bench_urls", RATELIMIT_USE_CACHE="default").enable()


def ensure_database() -> None:
    """Create the target database when it does not exist (connecting to the ``postgres`` maintenance db)."""
    import psycopg
    from django.conf import settings
    from psycopg import sql

    db = settings.DATABASES["default"]
    params: dict[str, Any] = {
        "host": db.get("HOST") or None,
        "port": db.get("PORT") or None,
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
    }
    params = {key: value for key, value in params.items() if value is not None}
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]]).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
                print(f"created database {db['NAME']!r}")
            except psycopg.errors.DuplicateDatabase:
                pass  # created concurrently (another benchmark uses the same database)


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def ensure_tenants() -> dict[str, int]:
    """qbench-org -> qbench-proj -> qbench-key, with hard monthly limits of 10**12 on every limited feature."""
    from django.db import transaction

    from quotas.models import QuotaLimit
    from quotas.rules import invalidate as forget_rules
    from tenants import tree
    from tenants.lineage import invalidate as forget_lineage
    from tenants.models import Tenant

    pks: dict[str, int] = {}
    with transaction.atomic():
        parent: Tenant | None = None
        for tenant_id, kind in ((ORG_ID, "organization"), (PROJECT_ID, "project"), (KEY_ID, "key")):
            tenant = Tenant.objects.filter(external_id=tenant_id).first()
            if tenant is None:
                tenant = tree.create_tenant(tenant_id, parent=parent, name=f"quota benchmark {kind}", kind=kind)
            elif tenant.parent_id != (parent.pk if parent else None) or not tenant.is_active or tenant.exempt:
                sys.exit(
                    f"tenant {tenant_id!r} exists but is not an active, non-exempt child of "
                    f"{parent.external_id if parent else 'nothing'!r}: delete the qbench-* tenants and rerun"
                )
            for feature in LIMITED_FEATURES:
                QuotaLimit.objects.update_or_create(
                    tenant=tenant,
                    feature=feature,
                    period=QuotaLimit.Period.MONTH,
                    defaults={"limit": LIMIT, "enforcement": QuotaLimit.Enforcement.HARD, "is_active": True},
                )
            pks[tenant_id] = tenant.pk
            parent = tenant
    # The caches are invalidated on commit by the models already; forgetting again is harmless and makes sure.
    forget_lineage([ORG_ID, PROJECT_ID, KEY_ID])
    for pk in pks.values():
        for feature in LIMITED_FEATURES:
            forget_rules(pk, feature)
    return pks


# --- driving requests ---------------------------------------------------------------------------------------------


def make_client(trusted_header: bool) -> Any:
    """The driver: with the product's default identity (an API key of the key tenant), or the trusted header."""
    from django.conf import settings
    from django.test import Client

    if trusted_header:
        settings.METERING = {
            **settings.METERING,
            "TENANT_RESOLVER": "tenants.resolvers.header_resolver",
            "TRUST_TENANT_HEADER": True,
        }
        return Client(headers={"X-Tenant-ID": KEY_ID})
    from tenants.apikeys import create_api_key

    return Client(headers={"Authorization": f"Bearer {create_api_key(KEY_ID, name='bench')[1]}"})


def run_requests(client: Any, variant: Variant, count: int) -> float:
    """Send ``count`` POSTs sequentially; the elapsed seconds. Stops on the first non-200 answer."""
    post = client.post
    path = variant.path
    started = time.perf_counter()
    for _ in range(count):
        response = post(path, data=BODY, content_type="application/json")
        if response.status_code != 200:
            raise SystemExit(f"{variant.name}: {path} answered {response.status_code}: {response.content[:500]!r}")
    return time.perf_counter() - started


def check_answers(client: Any) -> None:
    expected = {"text": " ".join(PROMPT.split()), "tokens": len(PROMPT.split())}
    for variant in VARIANTS:
        response = client.post(variant.path, data=BODY, content_type="application/json")
        if response.status_code != 200 or response.json() != expected:
            raise SystemExit(f"{variant.name}: unexpected answer {response.status_code} {response.content[:500]!r}")
        if variant.name in ("demo", "demo_async", "enforce_quota") and "RateLimit" not in response:
            raise SystemExit(f"{variant.name}: no RateLimit header: quotas do not seem to apply")


def measure(client: Any, rounds: int, requests: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {variant.name: [] for variant in VARIANTS}
    for round_index in range(rounds):
        shift = round_index % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]
        for variant in order:
            elapsed = run_requests(client, variant, requests)
            rates[variant.name].append(requests / elapsed)
        line = "  ".join(f"{v.name} {rates[v.name][-1]:7.1f}" for v in VARIANTS)
        print(f"round {round_index + 1}/{rounds}: {line}  (req/s)", flush=True)
    return rates


# --- counting queries and Redis commands --------------------------------------------------------------------------


class RedisCommandCounter:
    """Counts the Redis commands this process sends (pipelines: one round trip, several commands)."""

    def __init__(self) -> None:
        self.commands: Counter[str] = Counter()
        self.round_trips = 0

    @contextmanager
    def active(self) -> Iterator[None]:
        import redis.client

        counter = self
        original_execute = redis.client.Redis.execute_command
        original_pipeline = redis.client.Pipeline.execute

        def execute_command(self: Any, *args: Any, **options: Any) -> Any:
            counter.round_trips += 1
            counter.commands[str(args[0]).upper()] += 1
            return original_execute(self, *args, **options)

        def pipeline_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.round_trips += 1
            for command_args, _options in self.command_stack:
                counter.commands[str(command_args[0]).upper()] += 1
            return original_pipeline(self, *args, **kwargs)

        setattr(redis.client.Redis, "execute_command", execute_command)  # noqa: B010
        setattr(redis.client.Pipeline, "execute", pipeline_execute)  # noqa: B010
        try:
            yield
        finally:
            setattr(redis.client.Redis, "execute_command", original_execute)  # noqa: B010
            setattr(redis.client.Pipeline, "execute", original_pipeline)  # noqa: B010


class TransactionCounter:
    """Counts commits, rollbacks and connection health checks (round trips that CaptureQueriesContext misses)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @contextmanager
    def active(self, connection: Any) -> Iterator[None]:
        names = ("commit", "rollback", "is_usable", "connect")
        originals = {name: getattr(connection, name) for name in names}

        def wrap(name: str) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                self.counts[name] += 1
                return originals[name](*args, **kwargs)

            return wrapper

        for name in names:
            setattr(connection, name, wrap(name))
        try:
            yield
        finally:
            for name in names:
                delattr(connection, name)


def server_commandstats() -> Counter[str]:
    from django_redis import get_redis_connection

    stats = get_redis_connection("default").info("commandstats")
    return Counter({key.removeprefix("cmdstat_"): int(value["calls"]) for key, value in stats.items()})


def per_request(counter: Counter[str], requests: int) -> dict[str, float]:
    return {key: round(value / requests, 3) for key, value in sorted(counter.items(), key=lambda kv: -kv[1]) if value}


def count_variant(client: Any, variant: Variant, requests: int) -> dict[str, Any]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    redis_counter = RedisCommandCounter()
    transactions = TransactionCounter()
    server_before = server_commandstats()
    with CaptureQueriesContext(connection) as captured, redis_counter.active(), transactions.active(connection):
        run_requests(client, variant, requests)
    server_after = server_commandstats()
    server = server_after - server_before
    server.pop("info", None)  # our own INFO calls
    queries = len(captured.captured_queries)
    with CaptureQueriesContext(connection) as one_request:
        run_requests(client, variant, 1)
    return {
        "requests": requests,
        "sql_queries_per_request": queries / requests,
        "transactions_per_request": transactions.counts["commit"] / requests,
        "rollbacks_per_request": transactions.counts["rollback"] / requests,
        "connection_health_checks_per_request": transactions.counts["is_usable"] / requests,
        "new_connections": transactions.counts["connect"],
        "redis_round_trips_per_request": redis_counter.round_trips / requests,
        "redis_commands_sent_per_request": sum(redis_counter.commands.values()) / requests,
        "redis_commands_sent_by_name": per_request(redis_counter.commands, requests),
        "redis_server_commands_per_request": sum(server.values()) / requests,
        "redis_server_commands_by_name": per_request(server, requests),
        "sql_of_one_request": [query["sql"] for query in one_request.captured_queries],
    }


# --- where the time goes, without a profiler ---------------------------------------------------------------------

PHASES = {
    "demo": [
        ("tenants.middleware", "resolve_tenant", "resolve_tenant (TenantMiddleware: cached lineage)"),
        ("quotas.handler.QuotaPolicyHandler", "reserve", "reserve (tx 1: lock + reservation row; Redis decide)"),
        ("quotas.handler.Reservation", "commit", "commit (tx 2: lock + fact + rollups + close row; Redis decide)"),
        ("quotas.handler.Reservation", "release", "release (no-op after commit)"),
    ],
    "enforce_quota": [
        ("tenants.middleware", "resolve_tenant", "resolve_tenant (TenantMiddleware: cached lineage)"),
        ("quotas.handler.QuotaPolicyHandler", "consume", "consume (tx: lock + fact + rollups; Redis decide)"),
    ],
}


def _resolve(dotted: str) -> Any:
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, ValueError):
        return importlib.import_module(dotted)


def phase_breakdown(client: Any, variant: Variant, requests: int) -> dict[str, Any]:
    """Wall time per request split by phase, and inside each phase the time in SQL and in Redis calls.

    Wrappers cost about a microsecond each; no profiler, so the split is close to the unprofiled request.
    """
    import redis.client
    from django.db import connection
    from django.db.backends.utils import CursorWrapper

    stack: list[str] = []
    totals: defaultdict[tuple[str, str], float] = defaultdict(float)
    calls: Counter[str] = Counter()
    patches: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, replacement: Any) -> None:
        patches.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, replacement)

    def phase(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            stack.append(name)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[(name, "total")] += time.perf_counter() - started
                stack.pop()

        return wrapper

    def io(kind: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[(stack[-1] if stack else "outside the phases", kind)] += time.perf_counter() - started

        return wrapper

    labels = {}
    for owner_path, name, label in PHASES[variant.name]:
        owner = _resolve(owner_path)
        patch(owner, name, phase(label, getattr(owner, name)))
        labels[label] = name
    patch(CursorWrapper, "execute", io("sql", CursorWrapper.execute))
    patch(CursorWrapper, "executemany", io("sql", CursorWrapper.executemany))
    patch(redis.client.Redis, "execute_command", io("redis", redis.client.Redis.execute_command))
    patch(redis.client.Pipeline, "execute", io("redis", redis.client.Pipeline.execute))
    connection_patches = {
        name: getattr(connection, name) for name in ("commit", "rollback")
    }  # COMMIT is a round trip too
    for name, method in connection_patches.items():
        setattr(connection, name, io("sql", method))
    try:
        elapsed = run_requests(client, variant, requests)
    finally:
        for owner, name, original in reversed(patches):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        for name in connection_patches:
            delattr(connection, name)
    per_req = 1000 / requests
    request_ms = elapsed * per_req
    phases: dict[str, Any] = {}
    in_phases = 0.0
    for label in [*labels, "outside the phases"]:
        total = totals[(label, "total")] * per_req
        sql = totals[(label, "sql")] * per_req
        redis_ms = totals[(label, "redis")] * per_req
        if label == "outside the phases":
            total = request_ms - in_phases
        else:
            in_phases += total
        phases[label] = {
            "calls_per_request": round(calls[label] / requests, 2),
            "ms": round(total, 3),
            "sql_ms": round(sql, 3),
            "redis_ms": round(redis_ms, 3),
            "python_ms": round(total - sql - redis_ms, 3),
        }
    return {
        "requests": requests,
        "request_ms": round(request_ms, 3),
        "phases": phases,
        "note": (
            "sql_ms: Django CursorWrapper.execute (psycopg incl. the round trip; psycopg sends BEGIN within the "
            "first statement's execute) plus connection.commit; redis_ms: redis-py execute_command / pipeline execute; "
            "python_ms = ms - sql_ms - redis_ms. 'outside the phases' = test client, Django handler and "
            "middleware, async_to_sync / sync_to_async bridging, the view, JSON, headers."
        ),
    }


_MISSING = object()


# --- profiling ----------------------------------------------------------------------------------------------------

AREAS = [
    ("psycopg", "PostgreSQL client (psycopg: sending, waiting for the server, reading)"),
    ("/redis/", "Redis client (redis-py: sending, waiting for the server, reading)"),
    ("django_redis", "django-redis cache layer"),
    ("/django/db/", "Django ORM / db layer"),
    ("/django/test/", "django.test Client (request building)"),
    ("/django/", "Django request/response, middleware, other"),
    ("/asgiref/", "asgiref (async_to_sync / sync_to_async bridging)"),
    ("/work/main/quotas/", "project: quotas"),
    ("/work/main/metering/", "project: metering"),
    ("/work/main/tenants/", "project: tenants"),
    ("/work/main/project/", "project: demo view"),
]


def area_of(filename: str, function: str) -> str:
    if filename == "~":  # a built-in: attribute the C calls that matter
        if "_thread.lock" in function or "acquire" in function:
            return "waiting on another thread (the event loop thread of async_to_sync)"
        if "socket" in function or "select" in function or "poll" in function:
            return "socket I/O (Redis; PostgreSQL waits show under psycopg)"
        return "built-ins (other)"
    for needle, area in AREAS:
        if needle in filename.replace(str(REPO_ROOT), "/work/main"):
            return area
    if "/lib/python" in filename and "site-packages" not in filename:
        return "Python standard library"
    return "other libraries"


def profile_demo(client: Any, requests: int) -> dict[str, Any]:
    """cProfile (self time by function and by area), then pyinstrument (call tree) when it is installed."""
    variant = BY_NAME["demo"]
    profiler = cProfile.Profile()
    profiler.enable()
    elapsed = run_requests(client, variant, requests)
    profiler.disable()
    profiler.dump_stats(CPROFILE_PATH)
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total_tt = sum(row[2] for row in raw.values())
    by_area: Counter[str] = Counter()
    functions: list[tuple[str, int, float, float]] = []
    for (filename, line, function), (_cc, calls, tottime, cumtime, _callers) in raw.items():
        by_area[area_of(filename, function)] += tottime
        where = function if filename == "~" else f"{filename.replace(str(REPO_ROOT) + '/', '')}:{line}({function})"
        functions.append((where, int(calls), float(tottime), float(cumtime)))
    per_req_ms = 1000 / requests

    def top(key: int, count: int = 25) -> list[dict[str, Any]]:
        rows = sorted(functions, key=lambda row: -float(row[key]))[:count]
        return [
            {
                "function": where,
                "calls_per_request": round(calls / requests, 2),
                "self_ms_per_request": round(tottime * per_req_ms, 4),
                "cumulative_ms_per_request": round(cumtime * per_req_ms, 4),
            }
            for where, calls, tottime, cumtime in rows
        ]

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    result: dict[str, Any] = {
        "requests": requests,
        "profiled_wall_ms_per_request": round(elapsed * per_req_ms, 3),
        "note": (
            "cProfile sees the main thread only: the async view body runs in async_to_sync's event loop thread, "
            "so the main thread's wait for it shows as a lock acquire; the sync quota work (reserve, commit, "
            "release, middleware) runs in the main thread (thread_sensitive sync_to_async) and is fully seen."
        ),
        "self_time_by_area_ms_per_request": {
            area: round(seconds * per_req_ms, 4) for area, seconds in by_area.most_common()
        },
        "self_time_total_ms_per_request": round(total_tt * per_req_ms, 3),
        "top_self_time": top(2),
        "top_cumulative": top(3, 40),
        "cprofile_file": str(CPROFILE_PATH.relative_to(REPO_ROOT)),
    }
    try:
        from pyinstrument import Profiler
    except ImportError:
        result["pyinstrument"] = "not installed (.venv/bin/pip install pyinstrument for a call tree)"
        PROFILE_TEXT_PATH.write_text(text.getvalue())
        return result
    sampler = Profiler(interval=0.001, async_mode="disabled")
    sampler.start()
    elapsed = run_requests(client, variant, requests)
    sampler.stop()
    tree = sampler.output_text(unicode=True, color=False, show_all=False)
    PROFILE_TEXT_PATH.write_text(
        f"pyinstrument, {requests} demo requests ({elapsed * per_req_ms:.3f} ms each)\n{tree}\n\n"
        f"cProfile, sorted by cumulative time\n{text.getvalue()}"
    )
    PROFILE_HTML_PATH.write_text(sampler.output_html())
    result["pyinstrument_wall_ms_per_request"] = round(elapsed * per_req_ms, 3)
    result["pyinstrument_text_file"] = str(PROFILE_TEXT_PATH.relative_to(REPO_ROOT))
    result["pyinstrument_html_file"] = str(PROFILE_HTML_PATH.relative_to(REPO_ROOT))
    return result


# --- context ------------------------------------------------------------------------------------------------------


def round_trip_times(samples: int = 500) -> dict[str, float]:
    """Median latency of a trivial PostgreSQL query and a Redis PING from this process, for scale."""
    from django.db import connection
    from django_redis import get_redis_connection

    redis = get_redis_connection("default")
    db_times, redis_times, durable_times = [], [], []
    with connection.cursor() as cursor:
        # The floor of any durable write: one single-row INSERT committed on its own (autocommit), which waits for
        # the WAL to reach the disk, as every admitted request's fact does.
        cursor.execute("CREATE TABLE IF NOT EXISTS xaas_bench_commit_probe (id bigserial PRIMARY KEY, n int)")
        for _ in range(samples):
            started = time.perf_counter()
            cursor.execute("SELECT 1")
            cursor.fetchone()
            db_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            redis.ping()
            redis_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            cursor.execute("INSERT INTO xaas_bench_commit_probe (n) VALUES (1)")
            durable_times.append(time.perf_counter() - started)
        cursor.execute("TRUNCATE xaas_bench_commit_probe")
    return {
        "postgresql_select_1_us": round(statistics.median(db_times) * 1e6, 1),
        "redis_ping_us": round(statistics.median(redis_times) * 1e6, 1),
        "postgresql_durable_insert_us": round(statistics.median(durable_times) * 1e6, 1),
    }


def environment() -> dict[str, Any]:
    import django
    import django_redis
    import psycopg
    import redis
    from django.conf import settings
    from django.db import connection
    from django_redis import get_redis_connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg_version = cursor.fetchone()[0]
    db = settings.DATABASES["default"]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "django": django.get_version(),
        "django_redis": ".".join(map(str, django_redis.VERSION)),
        "django_ratelimit": importlib.metadata.version("django-ratelimit"),
        "redis_py": redis.__version__,
        "psycopg": psycopg.__version__,
        "postgresql": pg_version,
        "redis_server": get_redis_connection("default").info("server").get("redis_version"),
        "database": f"{db.get('HOST')}:{db.get('PORT')}/{db['NAME']}",
        "conn_max_age": db.get("CONN_MAX_AGE"),
        "debug": settings.DEBUG,
        "metering_adapter": getattr(settings, "METERING", {}).get("ADAPTER"),
    }


# --- report -------------------------------------------------------------------------------------------------------


def summarize(rates: dict[str, list[float]]) -> dict[str, Any]:
    bare = statistics.median(rates["bare"])
    bare_async = statistics.median(rates["bare_async"])
    summary: dict[str, Any] = {}
    for variant in VARIANTS:
        values = rates[variant.name]
        median = statistics.median(values)
        paired = [b / v for b, v in zip(rates["bare"], values, strict=True)]
        summary[variant.name] = {
            "label": variant.label,
            "path": variant.path,
            "description": variant.description,
            "rps_per_round": [round(value, 1) for value in values],
            "rps_median": round(median, 1),
            "rps_min": round(min(values), 1),
            "rps_max": round(max(values), 1),
            "ms_per_request_median": round(1000 / median, 3),
            "cost_multiple_vs_bare": round(bare / median, 2),
            "cost_multiple_vs_bare_paired_median": round(statistics.median(paired), 2),
            "added_ms_per_request_vs_bare": round(1000 / median - 1000 / bare, 3),
        }
    demo_async = summary["demo_async"]
    demo_async["cost_multiple_vs_bare_async"] = round(bare_async / demo_async["rps_median"], 2)
    demo_async["added_ms_per_request_vs_bare_async"] = round(1000 / demo_async["rps_median"] - 1000 / bare_async, 3)
    ratelimit = summary["ratelimit"]["rps_median"]
    for name in ("demo", "demo_async", "enforce_quota"):
        summary[name]["rate_vs_django_ratelimit"] = round(summary[name]["rps_median"] / ratelimit, 3)
    return summary


def print_table(summary: dict[str, Any], counts: dict[str, Any]) -> None:
    header = (
        f"{'variant':<22} {'req/s med':>10} {'min':>8} {'max':>8} {'ms/req':>8} {'bare/x':>7} "
        f"{'+ms':>7} {'SQL/req':>8} {'tx/req':>7} {'Redis rt':>9} {'Redis srv':>10}"
    )
    print()
    print(header)
    print("-" * len(header))
    for variant in VARIANTS:
        row = summary[variant.name]
        count = counts.get(variant.name)
        extra = (
            f"{count['sql_queries_per_request']:>8.1f} {count['transactions_per_request']:>7.1f} "
            f"{count['redis_round_trips_per_request']:>9.1f} {count['redis_server_commands_per_request']:>10.1f}"
            if count
            else f"{'':>8} {'':>7} {'':>9} {'':>10}"
        )
        print(
            f"{row['label']:<22} {row['rps_median']:>10.1f} {row['rps_min']:>8.1f} {row['rps_max']:>8.1f} "
            f"{row['ms_per_request_median']:>8.3f} {row['cost_multiple_vs_bare']:>7.2f} "
            f"{row['added_ms_per_request_vs_bare']:>7.3f} {extra}"
        )
    demo_async = summary["demo_async"]
    print(
        f"\ndemo async vs bare async view: {demo_async['cost_multiple_vs_bare_async']:.2f}x "
        f"(+{demo_async['added_ms_per_request_vs_bare_async']:.3f} ms/request)"
    )
    for name in ("demo", "demo_async", "enforce_quota"):
        print(f"{BY_NAME[name].label} rate / django-ratelimit rate: {summary[name]['rate_vs_django_ratelimit']:.2f}")
    print("bare/x: cost multiple of the median rates; +ms: added wall time per request over the bare view.")
    print("Redis rt: round trips this process sent; Redis srv: commands the server ran (incl. inside Lua scripts).")


def main() -> None:
    args = parse_args()
    setup_django()
    ensure_database()
    migrate()
    pks = ensure_tenants()
    from tenants.lineage import TOMBSTONE_SECONDS

    time.sleep(TOMBSTONE_SECONDS)  # the tree was just (re)written: let its lineages be cached again, as in steady state
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(
        f"{env['database']} (PostgreSQL {env['postgresql']}), Redis {env['redis_server']}, "
        f"{env['cpus']} CPUs, load {', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}"
    )
    client = make_client(args.trusted_header)
    print(f"identity: {'X-Tenant-ID (trusted header)' if args.trusted_header else 'API key (Bearer)'}")
    print(f"write mode: {args.write_mode}")
    check_answers(client)
    if args.warmup:
        for variant in VARIANTS:
            run_requests(client, variant, args.warmup)
    rtt = round_trip_times()
    print(
        f"round trips: PostgreSQL SELECT 1 {rtt['postgresql_select_1_us']} us, Redis PING {rtt['redis_ping_us']} us, "
        f"one durable single-row INSERT (autocommit) {rtt['postgresql_durable_insert_us']} us"
    )
    print(f"{args.rounds} rounds x {args.requests} requests per variant, interleaved\n", flush=True)
    started_at = datetime.now(UTC)
    rates = measure(client, args.rounds, args.requests)
    summary = summarize(rates)
    counts = {name: count_variant(client, BY_NAME[name], args.count_requests) for name in COUNTED}
    print_table(summary, counts)
    floor_us = rtt["postgresql_durable_insert_us"] + rtt["redis_ping_us"]
    print(
        f"floor of a durably recorded decision (a durable INSERT + a Redis round trip, no Python): {floor_us:.0f} us"
        f"; django-ratelimit adds {summary['ratelimit']['added_ms_per_request_vs_bare'] * 1000:.0f} us per request"
    )
    breakdown = {name: phase_breakdown(client, BY_NAME[name], args.requests) for name in PHASES}
    for name, split in breakdown.items():
        print(f"\nwhere a {BY_NAME[name].label} request's {split['request_ms']:.3f} ms go (ms per request):")
        print(f"  {'phase':<62} {'ms':>7} {'SQL':>7} {'Redis':>7} {'Python':>7}")
        for label, row in split["phases"].items():
            print(
                f"  {label:<62} {row['ms']:>7.3f} {row['sql_ms']:>7.3f} {row['redis_ms']:>7.3f} "
                f"{row['python_ms']:>7.3f}"
            )
    profile = None
    if args.profile:
        print(f"\nprofiling {args.profile} demo requests ...", flush=True)
        profile = profile_demo(client, args.profile)
        print("self time by area (cProfile, main thread), ms per request:")
        for area, ms in list(profile["self_time_by_area_ms_per_request"].items())[:12]:
            print(f"  {ms:8.3f}  {area}")
        print("top self time:")
        for row in profile["top_self_time"][:15]:
            print(f"  {row['self_ms_per_request']:8.4f} ms  x{row['calls_per_request']:<6} {row['function']}")
        if "pyinstrument_text_file" in profile:
            print(f"call tree: {profile['pyinstrument_text_file']} (and {profile['pyinstrument_html_file']})")
    result = {
        "benchmark": "quota_throughput",
        "command": " ".join([".venv/bin/python", "bench/quota_throughput.py", *sys.argv[1:]]),
        "started_at": started_at.isoformat(),
        "config": {
            "rounds": args.rounds,
            "requests_per_round": args.requests,
            "warmup_per_variant": args.warmup,
            "order": "one variant after another each round, the starting variant rotating per round",
            "driver": "django.test.Client, in-process, sequential, one client",
            "identity": f"X-Tenant-ID: {KEY_ID}" if args.trusted_header else f"Authorization: Bearer <key of {KEY_ID}>",
            "lineage": [ORG_ID, PROJECT_ID, KEY_ID],
            "tenant_pks": pks,
            "limits": f"hard, monthly, {LIMIT} on {', '.join(LIMITED_FEATURES)} at each of the three levels",
            "prompt_words": len(PROMPT.split()),
        },
        "environment": env,
        "round_trip_times": rtt,
        "results": summary,
        "per_request_counts": counts,
        "time_split": breakdown,
        "profile_demo": profile,
    }
    result["write_mode"] = args.write_mode
    if args.write_mode == "log":
        drained = drain_everything()
        result["drained"] = drained
        print(f"\nlog mode: drained {drained['facts']} facts in {drained['seconds']} s (untimed)")
    path = RESULTS_PATH if args.write_mode == "commit" else RESULTS_DIR / "quota_throughput_log.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")


def drain_everything() -> dict[str, Any]:
    """Log mode: persist every stream (no durability delay: nothing is crashed here), after the timed part."""
    from metering import drain

    started = time.monotonic()
    facts = 0
    while True:
        report = drain.drain(delay=0)
        facts += report.facts
        if report.entries == 0:
            break
    return {"facts": facts, "seconds": round(time.monotonic() - started, 2)}


if __name__ == "__main__":
    main()
