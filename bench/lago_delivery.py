"""Benchmark: events/s delivered from the outbox to a local Lago-compatible server, batches of 100 vs one event per
request, in one run.

Usage (PostgreSQL; the database is created if missing and migrated; its bench rows are replaced on every run)::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench_lago .venv/bin/python bench/lago_delivery.py \
        [--events 20000] [--single-events 2000] [--repeat 3] [--celery]

What runs: the strict fake Lago of the tests (``tests/lago_server.py``) in its own process on 127.0.0.1, and the
outbox filled with ``--events`` facts (one organization with a Lago subscription and 50 keys; facts and outbox rows
inserted in bulk: recording speed is not what is measured). Then, per round, the clock runs from the first claim
until every row is ``delivered``:

- ``batch``: ``metering.delivery.flush()`` with ``BATCH_SIZE = 100`` (the code a worker's flush task runs, one
  process, one thread);
- ``single``: the same with ``BATCH_SIZE = 1`` (one event per request), over ``--single-events`` facts;
- ``celery`` (with ``--celery`` and ``CELERY_BROKER_URL``): one real worker process (``-c 1``) draining the outbox
  after one ``flush_outbox`` task is queued, ``BATCH_SIZE = 100``; the clock includes queueing the task.

After each round the server is asked how many events it stored: every one exactly once, or the run fails.
Results are printed and written to ``bench/results/lago_delivery.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "lago_delivery.json"
API_KEY = "bench-lago-key"
ORG_ID = "bench-lago-org"
KEYS = 50


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="facts per batched round (default 20,000)")
    parser.add_argument("--single-events", type=int, default=2_000, help="facts per one-per-request round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per variant (default 3); the median is reported")
    parser.add_argument("--celery", action="store_true", help="also measure one real Celery worker process")
    args = parser.parse_args()
    if min(args.events, args.single_events, args.repeat) < 1:
        parser.error("--events, --single-events and --repeat must be positive")
    return args


def setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ.setdefault("DJANGO_DEBUG", "0")  # DEBUG keeps every query in memory
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-" + "k" * 40)
    os.environ.pop("REDIS_URL", None)  # delivery does not touch the counters
    sys.path.insert(0, str(REPO_ROOT))
    from django.conf import settings

    engine = settings.DATABASES["default"]["ENGINE"]
    if "postgresql" not in engine:
        sys.exit(
            f"bench/lago_delivery.py needs PostgreSQL, but the default database is {engine!r}.\n"
            "Set DATABASE_URL, e.g.\n"
            "  DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench_lago .venv/bin/python bench/lago_delivery.py"
        )
    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def ensure_database() -> None:
    import psycopg
    from django.conf import settings
    from psycopg import sql

    db = settings.DATABASES["default"]
    params = {key: db.get(name) or None for key, name in (("host", "HOST"), ("port", "PORT"), ("user", "USER"))}
    params["password"] = db.get("PASSWORD") or None
    with psycopg.connect(dbname="postgres", autocommit=True, **{k: v for k, v in params.items() if v}) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]]).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
            print(f"created database {db['NAME']!r}")


# --- the server ---------------------------------------------------------------------------------------------------


class LagoProcess:
    def __init__(self) -> None:
        command = [sys.executable, "-m", "tests.lago_server", "--api-key", API_KEY]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("READY "):
            self.process.kill()
            sys.exit(f"the fake Lago did not start: {line!r}")
        self.url = line.split(" ", 1)[1]

    def stats(self) -> dict[str, Any]:
        import httpx

        return httpx.get(self.url + "/_fake/stats", timeout=10).json()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


# --- the dataset --------------------------------------------------------------------------------------------------


def reset_outbox(events: int, round_id: str) -> None:
    """Bench tenants with ``events`` fresh facts, each with a due outbox row; tables vacuumed and analyzed."""
    from django.db import connection, transaction

    from metering.models import UsageOutbox, UsageRecord
    from tenants.models import Tenant
    from tenants.tree import create_tenant

    quote = connection.ops.quote_name
    outbox_table, facts_table = quote(UsageOutbox._meta.db_table), quote(UsageRecord._meta.db_table)
    with transaction.atomic():
        org = Tenant.objects.filter(external_id=ORG_ID).first()
        if org is None:
            org = create_tenant(ORG_ID, kind="organization")
            Tenant.objects.filter(pk=org.pk).update(lago_subscription_id="sub-bench")
            for index in range(KEYS):
                create_tenant(f"bench-lago-key-{index}", parent=org)
        bench_tenants = Tenant.objects.filter(path__startswith=org.path)
        with connection.cursor() as cursor:
            if not Tenant.objects.exclude(pk__in=bench_tenants.values("pk")).exists():
                # a database of the benchmark's own: start every round from empty tables
                cursor.execute(f"TRUNCATE {outbox_table}, {facts_table} CASCADE")
            else:
                UsageOutbox.objects.filter(record__tenant__in=bench_tenants).delete()
                UsageRecord.objects.filter(tenant__in=bench_tenants).delete()
        keys = list(Tenant.objects.filter(parent=org).values_list("pk", flat=True))
        now = datetime.now(UTC)
        records = [
            UsageRecord(
                tenant_id=keys[index % len(keys)],
                feature="llm_tokens",
                units=(index % 5000 + 1) * 250_000,
                timestamp=now - timedelta(milliseconds=index),
                transaction_id=f"{round_id}-{index}",
                metadata={"model": "bench-small", "region": "eu"},
            )
            for index in range(events)
        ]
        UsageRecord.objects.bulk_create(records, batch_size=5000)
        UsageOutbox.objects.bulk_create(
            [UsageOutbox(record_id=record.pk, sink="lago", next_attempt_at=now) for record in records],
            batch_size=5000,
        )
    with connection.cursor() as cursor:  # fresh statistics and no dead rows from the previous round
        cursor.execute(f"VACUUM ANALYZE {outbox_table}")
        cursor.execute(f"VACUUM ANALYZE {facts_table}")


def metering_settings(url: str, batch_size: int, queue: str | None = None) -> dict[str, Any]:
    return {
        "ADAPTER": "metering.adapters.lago.LagoMeteringAdapter",
        "SINK_URL": url,
        "API_KEY": API_KEY,
        "BATCH_SIZE": batch_size,
        "FLUSH_MAX_BATCHES": 1_000_000,
        "CELERY_QUEUE": queue,
    }


def pending_exists() -> bool:
    from metering.models import UsageOutbox

    return UsageOutbox.objects.filter(sink="lago", state="pending").exists()


def delivered() -> int:
    from metering.models import UsageOutbox

    return UsageOutbox.objects.filter(state="delivered").count()


def check(server: LagoProcess, expected_total: int) -> None:
    stats = server.stats()
    if stats["stored"] != expected_total or stats["double_billed"]:
        sys.exit(f"delivery was not exactly-once: {stats} (expected {expected_total} stored)")


def run_in_process(server: LagoProcess, events: int, batch_size: int, round_id: str) -> float:
    from django.test import override_settings

    from metering.delivery.deliver import flush

    reset_outbox(events, round_id)
    with override_settings(METERING=metering_settings(server.url, batch_size)):
        started = time.perf_counter()
        report = flush()
        elapsed = time.perf_counter() - started
    if report.delivered != events or delivered() != events:
        sys.exit(f"round {round_id}: {report}")
    return elapsed


def run_celery(server: LagoProcess, events: int, round_id: str) -> float:
    from django.conf import settings
    from django.test import override_settings

    from metering.tasks import flush_outbox

    queue = f"bench-lago-{uuid.uuid4().hex[:8]}"
    metering = metering_settings(server.url, 100, queue)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.lago_worker_settings",
        "LAGO_TEST_METERING": json.dumps(metering),
        "METERING_SWEEP_SECONDS": "3600",
    }
    db = settings.DATABASES["default"]
    env["DATABASE_URL"] = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    command = [str(REPO_ROOT / ".venv" / "bin" / "celery"), "-A", "project", "worker", "-c", "1", "-Q", queue]
    command += ["--without-gossip", "--without-mingle", "-l", "WARNING"]
    log = tempfile.NamedTemporaryFile(prefix="bench-lago-worker-", suffix=".log", delete=False)  # noqa: SIM115
    worker = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        reset_outbox(events, round_id)
        time.sleep(3)  # let the worker connect before the clock starts (setup, not measured)
        with override_settings(METERING=metering):
            started = time.perf_counter()
            flush_outbox.apply_async(args=("lago",), queue=queue)
            while pending_exists():  # an index probe: a COUNT every few ms would compete with the worker
                if worker.poll() is not None:
                    sys.exit(f"the Celery worker exited; see {log.name}")
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
        if delivered() != events:
            sys.exit(f"round {round_id}: {delivered()} of {events} delivered")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        from project.celery import app

        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(  # type: ignore[attr-defined]
                queue
            )
    return elapsed


def main() -> None:
    args = parse_args()
    setup_django()
    from django.db import connection

    server = LagoProcess()
    command = " ".join(shlex.quote(part) for part in sys.argv)
    env_url = os.environ.get("DATABASE_URL", "")
    total = 0
    variants: dict[str, dict[str, Any]] = {}
    try:
        plan: list[tuple[str, int]] = [("batch", args.events), ("single", args.single_events)]
        if args.celery:
            if not os.environ.get("CELERY_BROKER_URL"):
                sys.exit("--celery needs CELERY_BROKER_URL (e.g. amqp://guest:guest@127.0.0.1:5672//)")
            plan.append(("celery", args.events))
        # interleaved rounds: batch, single, (celery), batch, single, ...
        timings: dict[str, list[float]] = {name: [] for name, _ in plan}
        for round_index in range(args.repeat):
            for name, events in plan:
                round_id = f"r{uuid.uuid4().hex[:10]}"
                if name == "celery":
                    elapsed = run_celery(server, events, round_id)
                else:
                    elapsed = run_in_process(server, events, 100 if name == "batch" else 1, round_id)
                total += events
                check(server, total)
                timings[name].append(elapsed)
                print(
                    f"round {round_index + 1} {name:>6}: {events:>6} events in {elapsed:7.3f} s = "
                    f"{events / elapsed:9,.0f} events/s",
                    flush=True,
                )
        for name, events in plan:
            median = statistics.median(timings[name])
            variants[name] = {
                "events": events,
                "batch_size": 1 if name == "single" else 100,
                "seconds": timings[name],
                "median_seconds": median,
                "events_per_second": events / median,
            }
    finally:
        server.stop()
    speedup = variants["batch"]["events_per_second"] / variants["single"]["events_per_second"]
    result = {
        "command": f"DATABASE_URL={env_url} {command}" if env_url else command,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "database": connection.vendor,
        "variants": variants,
        "batch_vs_single": speedup,
        "target_events_per_second": 5000,
        "stored_exactly_once": total,
    }
    print()
    print(f"command: {result['command']}")
    for name, variant in variants.items():
        print(
            f"{name:>6}: {variant['events_per_second']:9,.0f} events/s "
            f"(batch {variant['batch_size']}, {variant['events']} events, median of {len(variant['seconds'])})"
        )
    print(
        f"batches of 100 vs one event per request: {speedup:.1f}x; target >= 5,000 events/s: "
        f"{'met' if variants['batch']['events_per_second'] >= 5000 else 'NOT met'}"
    )
    print(f"every one of the {total} events stored exactly once by the fake Lago")
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {RESULTS_PATH.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
