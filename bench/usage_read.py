"""Benchmark: reading a big organization's monthly usage from the hourly rollups vs. summing raw facts.

Usage (PostgreSQL only; the database is created if missing, the dataset is built once and reused)::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench .venv/bin/python bench/usage_read.py \
        [--facts 10000000] [--descendants 1000] [--repeat 200] [--naive-repeat 5] [--rebuild]

Dataset: one organization ``bench-org`` with ``--descendants`` tenants below it (projects at depth 1, keys at
depth 2), ``--facts`` usage facts (features ``llm_tokens`` and ``embeddings``, non-integer quantities, timestamps
from the first day of the month before last up to the build time), and their rollups at every lineage level. It is
generated with set-based SQL (``generate_series``), not through the Python API, and marked as complete in the
organization's ``metadata`` so that a rerun with the same size goes straight to the measurements.

Measured, interleaved in one run:

- ``metering.usage.get_usage("bench-org", "llm_tokens", month_start, month_end)``: whole hours, served by the
  organization's rollup rows (the cache is the local-memory one: ``REDIS_URL`` is ignored unless ``--use-redis``);
- the same call over a range that is not hour-aligned (``month_start + 90 min`` .. now): rollups plus the partial
  hours at both edges read from the facts;
- the naive query someone without rollups would write: ``SUM(units)`` over the facts joined to the subtree's
  tenants by path prefix.

Results are printed and written to ``bench/results/usage_read.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "usage_read.json"

ORG_ID = "bench-org"
FEATURE = "llm_tokens"
OTHER_FEATURE = "embeddings"
DATASET_VERSION = 2  # bump when the generator changes, so an old dataset is rebuilt
CHUNK = 1_000_000
KEYS_PER_PROJECT = 49  # 1,000 descendants = 20 projects x (1 + 49 keys)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=10_000_000, help="usage facts in the tree (default 10,000,000)")
    parser.add_argument("--descendants", type=int, default=1000, help="tenants below bench-org (default 1,000)")
    parser.add_argument("--repeat", type=int, default=200, help="get_usage calls per measured variant (default 200)")
    parser.add_argument("--naive-repeat", type=int, default=5, help="naive SUM queries measured (default 5)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the dataset even if it is already there")
    parser.add_argument(
        "--use-redis", action="store_true", help="keep REDIS_URL (aligned windows are then read from Redis counters)"
    )
    args = parser.parse_args()
    if args.facts < 1 or args.descendants < 1 or args.repeat < 1 or args.naive_repeat < 1:
        parser.error("--facts, --descendants, --repeat and --naive-repeat must be positive")
    return args


def setup_django(args: argparse.Namespace) -> None:
    if not args.use_redis and os.environ.get("REDIS_URL"):
        del os.environ["REDIS_URL"]
        print("note: REDIS_URL ignored (pass --use-redis to keep it): measuring the database rollup path")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    # DEBUG would keep every query in connection.queries; measure like production unless told otherwise.
    os.environ.setdefault("DJANGO_DEBUG", "0")
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-" + "k" * 40)
    sys.path.insert(0, str(REPO_ROOT))
    from django.conf import settings

    engine = settings.DATABASES["default"]["ENGINE"]
    if "postgresql" not in engine:
        sys.exit(
            f"bench/usage_read.py needs PostgreSQL, but the default database is {engine!r}.\n"
            "Set DATABASE_URL, e.g.\n"
            "  DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench .venv/bin/python bench/usage_read.py"
        )
    import django

    django.setup()


def ensure_database() -> None:
    """Create the target database when it does not exist (connecting to the ``postgres`` maintenance db)."""
    import psycopg
    from django.conf import settings
    from psycopg import sql

    db = settings.DATABASES["default"]
    params: dict[str, Any] = {
        name: db[key]
        for name, key in (("host", "HOST"), ("port", "PORT"), ("user", "USER"), ("password", "PASSWORD"))
        if db.get(key)
    }
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]]).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
            print(f"created database {db['NAME']!r}")


# --- dataset ----------------------------------------------------------------------------------------------------


def tables() -> dict[str, str]:
    from django.db import connection

    from metering.models import UsageRecord, UsageRollup
    from tenants.models import Tenant

    quote = connection.ops.quote_name
    return {
        "tenant": quote(Tenant._meta.db_table),
        "fact": quote(UsageRecord._meta.db_table),
        "rollup": quote(UsageRollup._meta.db_table),
    }


def month_start(moment: datetime, months_back: int = 0) -> datetime:
    year, month = moment.year, moment.month - months_back
    while month < 1:
        year, month = year - 1, month + 12
    return datetime(year, month, 1, tzinfo=UTC)


def dataset_spec(args: argparse.Namespace, now: datetime) -> dict[str, Any]:
    return {
        "version": DATASET_VERSION,
        "facts": args.facts,
        "descendants": args.descendants,
        # Facts are placed relative to the build time: a new month needs a new dataset.
        "month": now.strftime("%Y-%m"),
    }


def dataset_is_current(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The stored marker when ``bench-org`` holds exactly the requested dataset, else ``None``."""
    from tenants.models import Tenant

    org = Tenant.objects.filter(external_id=ORG_ID).values("path", "metadata").first()
    if org is None:
        return None
    marker = (org["metadata"] or {}).get("bench_dataset") or {}
    if any(marker.get(key) != value for key, value in spec.items()):
        return None
    descendants = Tenant.objects.filter(path__startswith=org["path"]).count() - 1
    return marker if descendants == spec["descendants"] else None


def drop_dataset() -> None:
    """Remove any previous ``bench-org`` tree with its facts and rollups."""
    from django.db import connection

    from tenants.models import Tenant

    t = tables()
    org = Tenant.objects.filter(external_id=ORG_ID).values("path").first()
    if org is None:
        return
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {t['tenant']} WHERE path NOT LIKE %s", [org["path"] + "%"])
        others = cursor.fetchone()[0]
        if others == 0:
            # The database holds nothing but the benchmark: truncating is much faster than deleting 10M rows.
            print("dropping the previous dataset (TRUNCATE: only bench tenants in this database)", flush=True)
            cursor.execute(f"TRUNCATE {t['rollup']}, {t['fact']}, {t['tenant']} CASCADE")
            return
        print("dropping the previous dataset (DELETE of the bench-org subtree)", flush=True)
        subtree = f"SELECT id FROM {t['tenant']} WHERE path LIKE %s"
        cursor.execute(f"DELETE FROM {t['rollup']} WHERE tenant_id IN ({subtree})", [org["path"] + "%"])
        cursor.execute(f"DELETE FROM {t['fact']} WHERE tenant_id IN ({subtree})", [org["path"] + "%"])
        cursor.execute(f"DELETE FROM {t['tenant']} WHERE path LIKE %s", [org["path"] + "%"])


def tree_shape(descendants: int) -> tuple[int, int]:
    """(projects, keys) with ``projects + keys == descendants``: 1,000 -> 20 projects x 49 keys."""
    projects = max(1, round(descendants / (1 + KEYS_PER_PROJECT)))
    return projects, descendants - projects


def build_tree(descendants: int) -> Any:
    """The organization through the API, then its projects and keys in bulk; paths set the way tenants.tree does."""
    from django.db import connection, transaction

    from tenants import tree
    from tenants.models import Tenant

    t = tables()
    projects, keys = tree_shape(descendants)
    with transaction.atomic():
        org = tree.create_tenant(ORG_ID, name="Benchmark organization", kind="organization")
        # bulk_create skips Tenant.save (so tree.place_new): paths and depths are set below, in SQL.
        parents = Tenant.objects.bulk_create(
            Tenant(external_id=f"{ORG_ID}.p{index:03d}", name=f"Project {index}", kind="project", parent_id=org.pk)
            for index in range(1, projects + 1)
        )
        Tenant.objects.bulk_create(
            (
                Tenant(
                    external_id=f"{parents[index % projects].external_id}.k{index:04d}",
                    name=f"Key {index}",
                    kind="key",
                    parent_id=parents[index % projects].pk,
                )
                for index in range(keys)
            ),
            batch_size=1000,
        )
        with connection.cursor() as cursor:
            # tree.place_new: path = parent.path + f"{pk}/", depth = parent_path.count("/") - 1; level by level.
            for parent_filter in ("p.id = %s", "p.parent_id = %s"):
                cursor.execute(
                    f"UPDATE {t['tenant']} AS c SET path = p.path || c.id || '/', "
                    f"depth = length(p.path) - length(replace(p.path, '/', '')) - 1 "
                    f"FROM {t['tenant']} AS p WHERE c.parent_id = p.id AND {parent_filter}",
                    [org.pk],
                )
    check_tree(org)
    print(f"tree: {ORG_ID} + {projects} projects + {keys} keys = {descendants} descendants", flush=True)
    return org


def other_columns(model: Any, handled: set[str]) -> tuple[str, str, dict[str, Any]]:
    """Columns of ``model`` the generator does not set (fields added later), with their defaults as parameters.

    Returns the extra column list, the matching placeholders (each with a leading comma) and the parameters.
    """
    from django.db import connection
    from django.utils import timezone

    columns, placeholders, params = "", "", {}
    for field in model._meta.concrete_fields:
        if field.primary_key or field.column in handled:
            continue
        auto = getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False)
        value = timezone.now() if auto else field.get_default()
        name = f"extra_{field.column}"
        columns += f", {connection.ops.quote_name(field.column)}"
        placeholders += f", %({name})s"
        params[name] = field.get_db_prep_save(value, connection)
    return columns, placeholders, params


def check_tree(org: Any) -> None:
    """Every path and depth is what tenants.tree.place_new would have written."""
    from tenants.models import Tenant

    rows = {pk: (parent, path, depth) for pk, parent, path, depth in _subtree_rows(Tenant, org.path)}
    for pk, (parent, path, depth) in rows.items():
        parent_path = rows[parent][1] if parent is not None else "/"
        if path != f"{parent_path}{pk}/" or depth != parent_path.count("/") - 1:
            raise SystemExit(f"tree check failed for tenant {pk}: path={path!r} depth={depth}")


def _subtree_rows(model: Any, path: str) -> Any:
    return model.objects.filter(path__startswith=path).values_list("pk", "parent_id", "path", "depth")


def insert_facts(org: Any, count: int, first: datetime, last: datetime) -> None:
    """``count`` facts, time-ordered like real traffic, 90% on keys and 10% on projects, in 1M-row statements."""
    from django.db import connection

    from metering.models import UsageRecord

    t = tables()
    span = (last - first).total_seconds()
    set_here = {"tenant_id", "feature", "units", "timestamp", "transaction_id", "metadata", "recorded_at"}
    extra_columns, extra_values, extra_params = other_columns(UsageRecord, set_here)
    # h: a 32-bit multiplicative (Fibonacci) hash of g; its high bits pick the tenant (h * n / 2**32), the rest
    # vary quantities and the jitter inside each fact's time slot.
    sql = f"""
        INSERT INTO {t["fact"]}
            (tenant_id, feature, units, timestamp, transaction_id, metadata, recorded_at{extra_columns})
        SELECT CASE WHEN g %% 10 = 0 OR k.n = 0 THEN p.ids[1 + (h * p.n / 4294967296)::int]
                    ELSE k.ids[1 + (h * k.n / 4294967296)::int] END,
               CASE WHEN (g / 10) %% 5 = 0 THEN %(other)s ELSE %(feature)s END,
               1 + (h / 7) %% 19999999,
               to_timestamp(%(first)s + %(span)s * ((g - 1) + (h / 4096) %% 1000 / 1000.0) / %(count)s),
               'b' || g,
               '{{}}'::jsonb,
               now(){extra_values}
        FROM (SELECT g, (g * 2654435761) %% 4294967296 AS h FROM generate_series(%(lo)s, %(hi)s) AS g) AS s,
             (SELECT array_agg(id ORDER BY id) AS ids, count(*) AS n FROM {t["tenant"]}
              WHERE parent_id = %(org)s) AS p,
             (SELECT coalesce(array_agg(c.id ORDER BY c.id), '{{}}') AS ids, count(c.id) AS n
              FROM {t["tenant"]} AS c JOIN {t["tenant"]} AS pp ON c.parent_id = pp.id
              WHERE pp.parent_id = %(org)s) AS k
    """
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
        for lo in range(1, count + 1, CHUNK):
            hi = min(count, lo + CHUNK - 1)
            cursor.execute(
                sql,
                {
                    "lo": lo,
                    "hi": hi,
                    "count": count,
                    "org": org.pk,
                    "first": first.timestamp(),
                    "span": span,
                    "feature": FEATURE,
                    "other": OTHER_FEATURE,
                    **extra_params,
                },
            )
            elapsed = time.perf_counter() - started
            print(f"  facts {hi:>12,} / {count:,}  {elapsed:7.1f} s  ({hi / elapsed:,.0f} rows/s)", flush=True)
        cursor.execute("SET synchronous_commit = on")


def build_rollups(org: Any) -> int:
    """Rollups of every lineage level from the facts, in SQL: per (tenant, feature, hour) then up each path."""
    from django.db import connection, transaction

    from metering.models import UsageRollup

    t = tables()
    extra_columns, extra_values, extra_params = other_columns(
        UsageRollup, {"tenant_id", "feature", "bucket", "units", "events"}
    )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL work_mem = '256MB'")
        cursor.execute(
            f"""
            INSERT INTO {t["rollup"]} (tenant_id, feature, bucket, units, events{extra_columns})
            WITH subtree AS (SELECT id, path FROM {t["tenant"]} WHERE path LIKE %(prefix)s),
            lineage AS (
                SELECT s.id AS tenant_id, ancestor::bigint AS ancestor_id
                FROM subtree AS s CROSS JOIN LATERAL unnest(string_to_array(trim(BOTH '/' FROM s.path), '/'))
                    AS ancestor
            ),
            own AS (
                SELECT tenant_id, feature, date_trunc('hour', timestamp, 'UTC') AS bucket,
                       sum(units) AS units, count(*) AS events
                FROM {t["fact"]} WHERE tenant_id IN (SELECT id FROM subtree)
                GROUP BY 1, 2, 3
            )
            SELECT l.ancestor_id, own.feature, own.bucket, sum(own.units), sum(own.events){extra_values}
            FROM own JOIN lineage AS l ON l.tenant_id = own.tenant_id
            GROUP BY 1, 2, 3
            -- Hour by hour, like the live upserts create them, so the table's layout is not clustered by tenant.
            ORDER BY 3, 1, 2
            """,
            {"prefix": org.path + "%", **extra_params},
        )
        return int(cursor.rowcount)


def build_dataset(args: argparse.Namespace, spec: dict[str, Any], now: datetime) -> dict[str, Any]:
    from django.db import connection

    from tenants.models import Tenant

    t = tables()
    drop_dataset()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    org = build_tree(args.descendants)
    timings["tree_s"] = time.perf_counter() - started

    first, last = month_start(now, 2), now - timedelta(minutes=1)
    print(f"inserting {args.facts:,} facts from {first:%Y-%m-%d} to {last:%Y-%m-%d %H:%M} UTC", flush=True)
    step = time.perf_counter()
    insert_facts(org, args.facts, first, last)
    timings["facts_s"] = time.perf_counter() - step

    print("building rollups for every lineage level ...", flush=True)
    step = time.perf_counter()
    rollup_rows = build_rollups(org)
    timings["rollups_s"] = time.perf_counter() - step
    print(f"  {rollup_rows:,} rollup rows in {timings['rollups_s']:.1f} s", flush=True)

    print("VACUUM ANALYZE ...", flush=True)
    step = time.perf_counter()
    with connection.cursor() as cursor:
        for table in (t["tenant"], t["fact"], t["rollup"]):
            cursor.execute(f"VACUUM ANALYZE {table}")
    timings["vacuum_analyze_s"] = time.perf_counter() - step
    timings["total_s"] = time.perf_counter() - started

    marker = {
        **spec,
        "built_at": now.isoformat(),
        "first_fact": first.isoformat(),
        "last_fact": last.isoformat(),
        "rollup_rows": rollup_rows,
        "generation": {key: round(value, 1) for key, value in timings.items()},
    }
    # Written last: an interrupted build has no marker and is rebuilt by the next run.
    metadata = {**(Tenant.objects.get(pk=org.pk).metadata or {}), "bench_dataset": marker}
    Tenant.objects.filter(pk=org.pk).update(metadata=metadata)
    print(f"dataset built in {timings['total_s']:.1f} s", flush=True)
    return marker


# --- measurements -----------------------------------------------------------------------------------------------


def naive_sum_sql() -> str:
    t = tables()
    return (
        f"SELECT SUM(f.units) FROM {t['fact']} AS f JOIN {t['tenant']} AS t ON t.id = f.tenant_id "
        f"WHERE t.path LIKE %s AND f.feature = %s AND f.timestamp >= %s AND f.timestamp < %s"
    )


def naive_units(path: str, start: datetime, end: datetime) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(naive_sum_sql(), [path + "%", FEATURE, start, end])
        return int(cursor.fetchone()[0] or 0)


def explain(sql: str, params: list[Any] | None) -> list[str]:
    """The plan as run; ``params=None`` for SQL that is already interpolated (no %-formatting then)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
        return [row[0] for row in cursor.fetchall()]


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function()
    return (time.perf_counter() - started) * 1000, result


def summary(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median_ms": round(statistics.median(ordered), 3),
        "p95_ms": round(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)], 3),  # nearest rank
        "min_ms": round(ordered[0], 3),
        "max_ms": round(ordered[-1], 3),
    }


def verify(path: str, ranges: dict[str, tuple[datetime | None, datetime | None]]) -> dict[str, Any]:
    """get_usage must equal the naive sum over the facts, for the org and a sample project and key."""
    from metering.usage import get_usage, get_usage_units
    from tenants.models import Tenant

    checks: dict[str, Any] = {}
    sample = [ORG_ID]
    project = Tenant.objects.filter(path__startswith=path, depth=1).order_by("pk").first()
    key = Tenant.objects.filter(path__startswith=path, depth=2).order_by("pk").first()
    sample += [tenant.external_id for tenant in (project, key) if tenant is not None]
    far_past, far_future = datetime(1970, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
    for tenant_id in sample:
        tenant_path = Tenant.objects.get(external_id=tenant_id).path
        for name, (start, end) in ranges.items():
            got = get_usage_units(tenant_id, FEATURE, start, end)
            want = naive_units(tenant_path, start or far_past, end or far_future)
            label = f"{tenant_id} {name}"
            checks[label] = {"get_usage_units": got, "naive_units": want, "ok": got == want}
            status = "ok" if got == want else "MISMATCH"
            print(
                f"  {label:<32} get_usage={get_usage(tenant_id, FEATURE, start, end)}  naive units={want:,}  {status}"
            )
            if got != want:
                raise SystemExit(f"verification failed: {label}: get_usage units {got} != naive units {want}")
    return checks


def capture_queries(function: Callable[[], Any]) -> list[str]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        function()
    return [query["sql"] for query in captured.captured_queries]


def measure(args: argparse.Namespace, path: str, start: datetime, end: datetime, now: datetime) -> dict[str, Any]:
    from metering.usage import get_usage

    odd_start = start + timedelta(minutes=90)
    variants: dict[str, Callable[[], Any]] = {
        "rollup_month": lambda: get_usage(ORG_ID, FEATURE, start, end),
        "rollup_unaligned": lambda: get_usage(ORG_ID, FEATURE, odd_start, now),
    }

    def naive() -> int:
        return naive_units(path, start, end)

    # Warm up: lineage cache, connection, plans and buffers.
    for function in variants.values():
        for _ in range(10):
            function()
    naive_first_ms, _ = timed(naive)

    samples: dict[str, list[float]] = {name: [] for name in [*variants, "naive_sum"]}
    rounds = args.naive_repeat
    per_round = [args.repeat // rounds + (1 if index < args.repeat % rounds else 0) for index in range(rounds)]
    print(f"measuring: {rounds} rounds, each = 1 naive SUM + ~{per_round[0]} calls of each get_usage variant")
    for index in range(rounds):
        order = list(variants) if index % 2 == 0 else list(reversed(variants))
        if index % 2:
            samples["naive_sum"].append(timed(naive)[0])
        for name in order:
            for _ in range(per_round[index]):
                samples[name].append(timed(variants[name])[0])
        if not index % 2:
            samples["naive_sum"].append(timed(naive)[0])
        print(f"  round {index + 1}/{rounds}: naive {samples['naive_sum'][-1]:.0f} ms", flush=True)

    results = {name: summary(values) for name, values in samples.items()}
    results["naive_sum"]["first_run_ms"] = round(naive_first_ms, 3)
    results["ranges"] = {
        "rollup_month": [start.isoformat(), end.isoformat()],
        "rollup_unaligned": [odd_start.isoformat(), now.isoformat()],
        "naive_sum": [start.isoformat(), end.isoformat()],
    }
    results["queries_per_call"] = {name: capture_queries(function) for name, function in variants.items()}
    return results


def database_info(path: str) -> dict[str, Any]:
    from django.db import connection

    t = tables()
    info: dict[str, Any] = {}
    with connection.cursor() as cursor:
        cursor.execute("SELECT version()")
        info["server"] = cursor.fetchone()[0]
        for setting in ("shared_buffers", "work_mem", "max_parallel_workers_per_gather", "jit"):
            cursor.execute(f"SHOW {setting}")
            info[setting] = cursor.fetchone()[0]
        for name, table in t.items():
            cursor.execute("SELECT pg_size_pretty(pg_total_relation_size(%s::regclass))", [table])
            info[f"{name}_table_size"] = cursor.fetchone()[0]
        cursor.execute(
            f"SELECT count(*) FROM {t['rollup']} WHERE tenant_id IN (SELECT id FROM {t['tenant']} WHERE path LIKE %s)",
            [path + "%"],
        )
        info["rollup_rows_in_tree"] = cursor.fetchone()[0]
    return info


def main() -> None:
    args = parse_args()
    setup_django(args)
    ensure_database()

    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    from tenants.models import Tenant

    print(f"database: {settings.DATABASES['default']['NAME']} on {settings.DATABASES['default']['HOST']}")
    print(f"cache: {settings.CACHES['default']['BACKEND']}  DEBUG={settings.DEBUG}")
    call_command("migrate", interactive=False, verbosity=0)

    now = datetime.now(UTC)
    spec = dataset_spec(args, now)
    marker = None if args.rebuild else dataset_is_current(spec)
    if marker is None:
        marker = build_dataset(args, spec, now)
        built_now = True
    else:
        print(f"dataset already there (built {marker['built_at']}, {marker['facts']:,} facts): reusing it")
        built_now = False
    org_path = Tenant.objects.get(external_id=ORG_ID).path

    start = month_start(now)
    end = month_start(start + timedelta(days=32))
    odd_start = start + timedelta(minutes=90)
    print("verifying get_usage against the naive sum ...")
    checks = verify(org_path, {"month": (start, end), "unaligned": (odd_start, now), "total": (None, None)})

    results = measure(args, org_path, start, end, now)
    plans = {
        "naive_sum": explain(naive_sum_sql(), [org_path + "%", FEATURE, start, end]),
        # The captured SQL of one get_usage call, already interpolated by the driver.
        "rollup_month": explain(results["queries_per_call"]["rollup_month"][-1], None),
        "rollup_unaligned": [explain(sql, None) for sql in results["queries_per_call"]["rollup_unaligned"]],
    }
    connection.close()

    rollup, unaligned, naive = results["rollup_month"], results["rollup_unaligned"], results["naive_sum"]
    ratios = {
        "naive_over_rollup_month_median": round(naive["median_ms"] / rollup["median_ms"], 1),
        "naive_over_rollup_month_p95": round(naive["p95_ms"] / rollup["p95_ms"], 1),
        "naive_over_rollup_unaligned_median": round(naive["median_ms"] / unaligned["median_ms"], 1),
    }
    print()
    print(f"facts={marker['facts']:,}  descendants={marker['descendants']:,}  month={start:%Y-%m}")
    print(f"{'variant':<52} {'n':>5} {'median ms':>11} {'p95 ms':>11}")
    rows = [
        ("get_usage, month (rollups)", rollup),
        ("get_usage, month+90min .. now (rollups + edge facts)", unaligned),
        ("naive SUM over facts, month", naive),
    ]
    for label, row in rows:
        print(f"{label:<52} {row['n']:>5} {row['median_ms']:>11.2f} {row['p95_ms']:>11.2f}")
    print(
        f"ratio naive/rollup (month): median {ratios['naive_over_rollup_month_median']:,}x, "
        f"p95 {ratios['naive_over_rollup_month_p95']:,}x; "
        f"naive/unaligned median {ratios['naive_over_rollup_unaligned_median']:,}x"
    )
    print(f"naive SUM first (warm-up) run: {naive['first_run_ms']:.0f} ms; p95 of {naive['n']} runs is their max")
    generation = marker.get("generation", {})
    print(f"dataset generation ({'this run' if built_now else 'earlier run'}): {generation}")

    payload = {
        "benchmark": "usage_read",
        "measured_at": now.isoformat(),
        "command": " ".join(sys.argv),
        "args": vars(args),
        "dataset": {**marker, "built_this_run": built_now, "org_path": org_path},
        "results": results,
        "ratios": ratios,
        "verification": checks,
        "plans": plans,
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "cache_backend": settings.CACHES["default"]["BACKEND"],
            "debug": settings.DEBUG,
            **database_info(org_path),
        },
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"results written to {RESULTS_PATH.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
