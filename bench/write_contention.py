"""Benchmark: do concurrent writers of ONE tenant tree scale like writers spread over many trees?

Usage (PostgreSQL and Redis required; the database is created if missing, then migrated)::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench REDIS_URL=redis://127.0.0.1:6379/12 \
        .venv/bin/python bench/write_contention.py [--writers 16] [--seconds 4] [--rounds 3] \
        [--levels sql,consume] [--write-mode commit|log] [--drain-timeout 120]

``--writers`` writer PROCESSES (spawned, each with its own database and Redis connections) write facts as fast as
they can for ``--seconds`` per phase. Two layouts, measured in the same run and interleaved (each round runs both,
the first one alternating, so drift on a shared machine hits both alike):

- ``one``: ONE tree with a 3-level lineage, ``wc-org`` -> 4 projects ``wc-p0..3`` -> 16 keys ``wc-k0..15`` (four per
  project); writer ``i`` writes for key ``i % 16``. Every fact rolls up to the same organization row per hour
  (the hot row this benchmark is about), and to its project's row;
- ``spread``: ``--writers`` trees ``wc-s<i>-org`` -> ``wc-s<i>-p`` -> ``wc-s<i>-k``; writer ``i`` writes for its
  own tree's key. No row is shared between writers.

Levels (``--levels``, default both):

- ``sql``: the statements one commit-mode fact sends on PostgreSQL, on a plain psycopg connection in pipeline mode
  (two round trips, as ``metering.recorder`` sends them): ``BEGIN``, the tree lock (shared), the fact's ``INSERT``;
  then the rollup upsert of every level (``metering.rollups.add_statement``, the product's own statement) and
  ``COMMIT``. No Python stack, no Redis: the database's view of the contention;
- ``consume``: ``QuotaPolicyHandler(key).consume("wc_calls", 1)``, the whole product path, with a hard monthly
  ``QuotaLimit`` (10**12) at every level of both layouts and the Redis counters on (``REDIS_URL``).

``--write-mode`` (default ``commit``): ``log`` runs the ``consume`` level with ``METERING["WRITE_MODE"] = "log"``
(admission in Redis, facts appended to the tree's stream); it needs the log-mode write path and the drainer
(``metering.drain``): without them the benchmark says so and measures nothing. In log mode the drainer is not run
during the measured phases: afterwards ``manage.py metering_drain`` is started as a subprocess and the benchmark
waits (``--drain-timeout``) until the database holds exactly the facts that were admitted, and checks it.

Reported: per level, the median facts/s of each layout over the rounds and the ratio ``one / spread`` (target:
>= 0.9); after the run, every fact of the run is checked against the rollups (facts == rollups at every level).
Results: a table on stdout and ``bench/results/write_contention.json`` (gitignored).

Nothing is flushed: the tenants and limits are created once and reused (rows from earlier runs stay); facts carry
transaction ids unique to the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "write_contention.json"
FEATURE = "wc_calls"
LIMIT = 10**12
PROJECTS, KEYS = 4, 16
EXAMPLE_COMMAND = (
    "DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench REDIS_URL=redis://127.0.0.1:6379/12 "
    ".venv/bin/python bench/write_contention.py"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=16, help="writer processes (default 16)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per layout per round (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--levels", default="sql,consume", help="comma-separated: sql, consume (default both)")
    parser.add_argument("--write-mode", choices=["commit", "log"], default="commit", help="consume's write mode")
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="log mode: seconds to wait for the drain")
    args = parser.parse_args()
    args.levels = [level.strip() for level in args.levels.split(",") if level.strip()]
    if not set(args.levels) <= {"sql", "consume"} or not args.levels:
        parser.error("--levels takes sql and/or consume")
    if args.writers < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--writers, --seconds and --rounds must be positive")
    return args


# --- setup (parent and every writer) ------------------------------------------------------------------------------


def setup_django(write_mode: str = "commit") -> None:
    missing = [name for name in ("DATABASE_URL", "REDIS_URL") if not os.environ.get(name)]
    if missing:
        sys.exit(f"bench/write_contention.py needs {' and '.join(missing)}, e.g.\n  {EXAMPLE_COMMAND}")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ.setdefault("DJANGO_DEBUG", "0")  # DEBUG keeps every query in memory
    os.environ.setdefault("DATABASE_POOL_MIN_SIZE", "1")  # 16 processes share the server's max_connections
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-" + "k" * 40)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import django
    from django.conf import settings

    if "postgresql" not in settings.DATABASES["default"]["ENGINE"]:
        sys.exit(f"DATABASE_URL must name a PostgreSQL database, e.g.\n  {EXAMPLE_COMMAND}")
    if settings.CACHES["default"]["BACKEND"] != "django_redis.cache.RedisCache":
        sys.exit("the default cache must be django-redis; set REDIS_URL")
    django.setup()
    if write_mode != "commit":
        from django.test.utils import override_settings

        override_settings(METERING={**getattr(settings, "METERING", {}), "WRITE_MODE": write_mode}).enable()


def one_tree_ids() -> tuple[str, list[str], list[str]]:
    return "wc-org", [f"wc-p{p}" for p in range(PROJECTS)], [f"wc-k{k}" for k in range(KEYS)]


def spread_ids(index: int) -> tuple[str, str, str]:
    return f"wc-s{index}-org", f"wc-s{index}-p", f"wc-s{index}-k"


def ensure_tenants(writers: int) -> None:
    """Both layouts, each level with a hard monthly limit of 10**12 ``wc_calls``."""
    from django.db import transaction

    from quotas.models import QuotaLimit
    from tenants import tree
    from tenants.models import Tenant

    def tenant(tenant_id: str, parent: Tenant | None, kind: str) -> Tenant:
        found = Tenant.objects.filter(external_id=tenant_id).first()
        if found is None:
            found = tree.create_tenant(tenant_id, parent=parent, name=f"write contention {kind}", kind=kind)
        elif found.parent_id != (parent.pk if parent else None) or not found.is_active or found.exempt:
            sys.exit(f"tenant {tenant_id!r} exists with another parent or state: delete the wc-* tenants and rerun")
        QuotaLimit.objects.update_or_create(
            tenant=found,
            feature=FEATURE,
            period=QuotaLimit.Period.MONTH,
            defaults={"limit": LIMIT, "enforcement": QuotaLimit.Enforcement.HARD, "is_active": True},
        )
        return found

    with transaction.atomic():
        org_id, project_ids, key_ids = one_tree_ids()
        org = tenant(org_id, None, "organization")
        projects = [tenant(project_id, org, "project") for project_id in project_ids]
        for index, key_id in enumerate(key_ids):
            tenant(key_id, projects[index % PROJECTS], "key")
        for index in range(writers):
            s_org, s_project, s_key = spread_ids(index)
            tenant(s_key, tenant(s_project, tenant(s_org, None, "organization"), "project"), "key")


def key_for(layout: str, writer: int) -> str:
    return one_tree_ids()[2][writer % KEYS] if layout == "one" else spread_ids(writer)[2]


# --- the writers --------------------------------------------------------------------------------------------------


class SqlWriter:
    """The statements of one commit-mode fact, sent like the recorder sends them (two pipelined round trips)."""

    _conn: Any = None  # one raw connection per process, for both layouts

    def __init__(self, key_id: str) -> None:
        import psycopg
        from django.db import connection

        from metering.models import UsageRecord
        from metering.windows import floor_hour
        from tenants.lineage import get_context

        self.floor_hour = floor_hour
        context = get_context(key_id)
        self.tenant_pk = context.tenant.pk
        self.root_pk = context.root.pk
        self.lineage_pks = [level.pk for level in context.lineage]
        self.table = connection.ops.quote_name(UsageRecord._meta.db_table)
        if SqlWriter._conn is None:
            params = connection.get_connection_params()
            params.pop("cursor_factory", None)
            params.pop("context", None)
            SqlWriter._conn = psycopg.connect(**params, application_name="wc-writer")
        self.conn = SqlWriter._conn
        self.prefix = uuid.uuid4().hex[:12]
        self.count = 0

    def write(self) -> None:
        from metering import rollups
        from tenants.locks import tree_lock_statement

        now = datetime.now(UTC)
        self.count += 1
        lock_sql, lock_params = tree_lock_statement(self.root_pk, exclusive=False)
        fact_sql = (
            f"INSERT INTO {self.table} (tenant_id, feature, units, timestamp, transaction_id, metadata, recorded_at) "
            "VALUES (%s, %s, %s, %s, %s, '{}', %s) ON CONFLICT (tenant_id, transaction_id) DO NOTHING RETURNING id"
        )
        rollup_sql, rollup_params = rollups.add_statement(self.lineage_pks, FEATURE, self.floor_hour(now), 1_000_000)
        with self.conn.cursor() as cursor:
            with self.conn.pipeline():
                cursor.execute(lock_sql, lock_params)  # psycopg sends BEGIN first, in the same round trip
                cursor.execute(
                    fact_sql,
                    [self.tenant_pk, FEATURE, 1_000_000, now, f"wc-{self.prefix}-{self.count}", now],
                    prepare=True,
                )
            if cursor.fetchone() is None:
                raise RuntimeError("the fact was not inserted")
            with self.conn.pipeline():
                cursor.execute(rollup_sql, rollup_params, prepare=True)
                self.conn.commit()


class ConsumeWriter:
    def __init__(self, key_id: str) -> None:
        from quotas.handler import QuotaPolicyHandler

        self.handler = QuotaPolicyHandler(key_id)
        self.handler.context  # noqa: B018 (resolve the lineage before the clock starts)

    def write(self) -> None:
        self.handler.consume(FEATURE, 1)


def writer_main(index: int, write_mode: str, commands: Any, results: Any) -> None:
    """Commands: ``("prepare", level, layout)`` (connect, warm up, answer ready), ``("run", start_at, seconds)``
    (write until ``start_at + seconds``, answer the counts), ``None`` (exit)."""
    setup_django(write_mode)
    writers: dict[tuple[str, str], Any] = {}
    writer: Any = None
    level = layout = ""
    while True:
        command = commands.get()
        if command is None:
            return
        if command[0] == "prepare":
            _, level, layout = command
            try:
                if (level, layout) not in writers:
                    key_id = key_for(layout, index)
                    writers[level, layout] = SqlWriter(key_id) if level == "sql" else ConsumeWriter(key_id)
                writer = writers[level, layout]
                writer.write()  # warm (connections, prepared statements, scripts loaded) before the clock
                results.put(("ready", index, 1))
            except Exception as error:
                print(f"writer {index}: cannot write: {type(error).__name__}: {error}", file=sys.stderr)
                writer = None
                results.put(("ready", index, 0))
            continue
        _, start_at, seconds = command
        done, errors, performed = 0, 0, 0  # performed: every admitted fact, the last one past the deadline too
        time.sleep(max(0.0, start_at - time.time()))
        deadline = start_at + seconds
        while writer is not None:
            try:
                writer.write()
                performed += 1
            except Exception as error:  # reported, never hidden: a refused or failed fact is not counted
                errors += 1
                if errors == 1:
                    print(f"writer {index}: {type(error).__name__}: {error}", file=sys.stderr)
                if level == "sql":
                    writer.conn.rollback()
            if time.time() > deadline:
                break
            done += 1
        results.put(("done", index, done, errors, performed))


# --- driving ------------------------------------------------------------------------------------------------------


class LockWaits:
    """Samples pg_stat_activity every 10 ms during a phase: the share of the database's active backends (other than
    this one) waiting on a lock (``wait_event_type = 'Lock'``: the hot row's ``transactionid`` wait). A measure of
    the queue itself, which a CPU-starved machine does not hide the way it hides throughput differences."""

    def __init__(self) -> None:
        import threading

        self.stop = threading.Event()
        self.samples: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg
        from django.db import connection

        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        with psycopg.connect(**params, autocommit=True) as conn:
            while not self.stop.wait(0.01):
                for kind, event in conn.execute(
                    "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND state = 'active'"
                ):
                    key = f"{kind}:{event}" if kind else "running"
                    self.samples[key] = self.samples.get(key, 0) + 1

    def __enter__(self) -> LockWaits:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def lock_share(self) -> float:
        total = sum(self.samples.values())
        waiting = sum(count for key, count in self.samples.items() if key.startswith("Lock:"))
        return waiting / total if total else 0.0


def run_phase(
    queues: list[Any], results: Any, level: str, layout: str, seconds: float
) -> tuple[float, int, int, float]:
    """facts/s finished inside the window, errors, every fact admitted (warm-up and the last one included), and the
    share of active backends waiting on a lock meanwhile."""
    for queue in queues:
        queue.put(("prepare", level, layout))
    warm = 0
    for _ in queues:
        kind, _, performed = results.get(timeout=300)
        assert kind == "ready"
        warm += performed
    start_at = time.time() + 0.2  # every writer is waiting on its queue: one common start
    for queue in queues:
        queue.put(("run", start_at, seconds))
    total, errors, admitted = 0, len(queues) - warm, warm
    with LockWaits() as waits:
        for _ in queues:
            kind, _, done, failed, performed = results.get(timeout=seconds + 300)
            assert kind == "done"
            total += done
            errors += failed
            admitted += performed
    return total / seconds, errors, admitted, waits.lock_share()


def log_mode_available() -> str | None:
    """Why log mode cannot be measured in this checkout, or ``None``."""
    from metering import log

    if not hasattr(log, "is_log_mode"):
        return "metering.log.is_log_mode is missing"
    for module in ("metering.drain",):
        if importlib.util.find_spec(module) is None:
            return f"{module} (the log-mode drainer) is missing in this checkout"
    return None


def database_facts() -> int:
    from metering.models import UsageRecord

    return UsageRecord.objects.filter(feature=FEATURE, tenant__external_id__startswith="wc-").count()


def check_rollups() -> dict[str, Any]:
    """Facts == rollups (units and events) for every tenant of both layouts, summed over every hour and slot."""
    from django.db.models import Count, Sum

    from metering.models import UsageRecord, UsageRollup
    from tenants.models import Tenant

    mismatches = []
    tenants = Tenant.objects.filter(external_id__startswith="wc-")
    for tenant in tenants:
        facts = UsageRecord.objects.filter(tenant__path__startswith=tenant.path, feature=FEATURE).aggregate(
            units=Sum("units"), events=Count("id")
        )
        rolled = UsageRollup.objects.filter(tenant=tenant, feature=FEATURE).aggregate(
            units=Sum("units"), events=Sum("events")
        )
        want = (int(facts["units"] or 0), int(facts["events"] or 0))
        have = (int(rolled["units"] or 0), int(rolled["events"] or 0))
        if want != have:
            mismatches.append({"tenant": tenant.external_id, "facts": want, "rollups": have})
    return {"tenants": tenants.count(), "mismatches": mismatches}


def fold_run() -> dict[str, Any] | None:
    """Fold the wc-* trees' slots (every hour, the current one too: the writers are done) and time it."""
    from datetime import timedelta

    from metering import rollups
    from metering.windows import floor_hour
    from tenants.models import Tenant

    if not hasattr(rollups, "fold"):
        return None  # a checkout without rollup slots
    roots = Tenant.objects.filter(external_id__startswith="wc-", parent__isnull=True).values_list("pk", flat=True)
    started = time.perf_counter()
    report = rollups.fold(floor_hour(datetime.now(UTC)) + timedelta(hours=1), roots=list(roots))
    return {
        "trees": report.trees,
        "rows_folded": report.rows_folded,
        "rows_left": report.rows_left,
        "seconds": round(time.perf_counter() - started, 3),
    }


def wait_for_drain(admitted_before: int, admitted: int, timeout: float) -> dict[str, Any]:
    expected = admitted_before + admitted
    drainer = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "manage.py"), "metering_drain"], cwd=REPO_ROOT, env=dict(os.environ)
    )
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    try:
        while time.monotonic() < deadline:
            stored = database_facts()
            if stored >= expected:
                break
            time.sleep(0.5)
    finally:
        drainer.terminate()
        drainer.wait(timeout=30)
    stored = database_facts()
    return {"expected": expected, "stored": stored, "exact": stored == expected, "seconds": time.monotonic() - started}


def main() -> None:
    args = parse_args()
    setup_django()
    from bench.quota_throughput import ensure_database, migrate

    ensure_database()
    migrate()
    if args.write_mode == "log":
        reason = log_mode_available()
        if reason:
            print(f"--write-mode log: not measured: {reason}. The commit-mode figures need no flag.")
            return
        if "consume" not in args.levels:
            sys.exit("--write-mode log measures the consume level: add it to --levels")
    ensure_tenants(args.writers)
    facts_before = database_facts()

    ctx = mp.get_context("spawn")
    queues = [ctx.Queue() for _ in range(args.writers)]
    results = ctx.Queue()
    processes = [
        ctx.Process(target=writer_main, args=(index, args.write_mode, queues[index], results), daemon=True)
        for index in range(args.writers)
    ]
    for process in processes:
        process.start()
    rates: dict[str, dict[str, list[float]]] = {level: {"one": [], "spread": []} for level in args.levels}
    waits: dict[str, dict[str, list[float]]] = {level: {"one": [], "spread": []} for level in args.levels}
    errors: dict[str, int] = {}
    admitted = 0
    try:
        for round_index in range(args.rounds):
            for level in args.levels:
                layouts = ["one", "spread"] if round_index % 2 == 0 else ["spread", "one"]
                for layout in layouts:
                    rate, failed, performed, waiting = run_phase(queues, results, level, layout, args.seconds)
                    admitted += performed
                    waits[level][layout].append(waiting)
                    rates[level][layout].append(rate)
                    errors[f"{level}/{layout}"] = errors.get(f"{level}/{layout}", 0) + failed
                    print(
                        f"round {round_index + 1} {level:8} {layout:6} {rate:9,.0f} facts/s, "
                        f"{waiting:4.0%} of active backends waiting on a lock ({failed} errors)"
                    )
        for queue in queues:
            queue.put(None)
        for process in processes:
            process.join(timeout=60)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()

    summary: dict[str, Any] = {}
    for level, by_layout in rates.items():
        one, spread = statistics.median(by_layout["one"]), statistics.median(by_layout["spread"])
        ratios = [o / s for o, s in zip(by_layout["one"], by_layout["spread"], strict=True)]
        summary[level] = {
            "one_tree_facts_per_s": round(one),
            "spread_facts_per_s": round(spread),
            "ratio_one_over_spread": round(one / spread, 3),
            "per_round_ratios": [round(ratio, 3) for ratio in ratios],
            "lock_wait_share_one": round(statistics.median(waits[level]["one"]), 3),
            "lock_wait_share_spread": round(statistics.median(waits[level]["spread"]), 3),
            "rates": by_layout,
        }
    drain = None
    if args.write_mode == "log":
        drain = wait_for_drain(facts_before, admitted, args.drain_timeout)
        print(f"drain: {drain['stored'] - facts_before:,} facts persisted of {admitted:,} admitted: {drain}")
    else:
        stored = database_facts() - facts_before
        if stored != admitted:
            print(f"facts stored {stored:,} != admitted {admitted:,}")
    folded = fold_run()
    exactness = check_rollups()
    print()
    print(
        f"{args.writers} writer processes, {args.seconds:g} s per layout, {args.rounds} rounds, {args.write_mode} mode"
    )
    print(f"{'level':10} {'one tree':>12} {'spread':>12} {'one/spread':>11} {'lock waits one/spread':>22}")
    for level, figures in summary.items():
        print(
            f"{level:10} {figures['one_tree_facts_per_s']:>10,}/s {figures['spread_facts_per_s']:>10,}/s "
            f"{figures['ratio_one_over_spread']:>10.2f}x "
            f"{figures['lock_wait_share_one']:>14.0%} / {figures['lock_wait_share_spread']:.0%}"
        )
    if folded:
        print(f"fold afterwards (every hour, the current one too): {folded}")
    print(f"facts == rollups at every level of {exactness['tenants']} tenants: {not exactness['mismatches']}")
    if exactness["mismatches"]:
        print(json.dumps(exactness["mismatches"][:10], indent=2, default=str))
    if any(errors.values()):
        print(f"errors (not counted): {errors}")
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(),
                "args": {k: v for k, v in vars(args).items()},
                "summary": summary,
                "errors": errors,
                "exactness": exactness,
                "drain": drain,
                "fold": folded,
                "admitted": admitted,
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            },
            indent=2,
            default=str,
        )
    )
    print(f"results: {RESULTS_PATH.relative_to(REPO_ROOT)}")
    if exactness["mismatches"] or (drain is not None and not drain["exact"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
