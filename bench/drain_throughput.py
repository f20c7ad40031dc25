"""Benchmark: facts/s persisted by one log-mode drainer (``metering.drain``) on PostgreSQL.

Usage (PostgreSQL and Redis required; the database is created if missing, then migrated)::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench REDIS_URL=redis://127.0.0.1:6379/12 \
        .venv/bin/python bench/drain_throughput.py [--entries 50000] [--trees 1,100] [--rounds 3] [--batch 5000]

For each tree count, each round writes ``--entries`` stream entries exactly as the log writer does
(``Entry.encode()`` XADDed to the tree's stream, the tree put on the work list; pipelined, not timed), spread
round-robin over the trees, each tree a 3-level lineage (org -> project -> 2 keys; facts on the keys and the
project), 2 features, timestamps over the last 3 hours; then times one ``drain.drain()`` call (no durability delay:
``LOG_DRAIN_DELAY_SECONDS=0``) until the work list is empty, and checks that every entry became exactly one fact and
that the rollups grew by exactly the entries' units at every level. Reported: median facts/s over the rounds, and
the facts per CPU second of the drainer process (what it costs itself, whatever else the machine runs), and the
SQL time by statement kind of the last round. Results: stdout and
``bench/results/drain_throughput.json``. Tenants are created once (``dbench-*``) and reused; facts accumulate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "drain_throughput.json"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--trees", default="1,100", help="comma-separated tree counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=5000, help="METERING['LOG_DRAIN_BATCH']")
    return parser.parse_args()


def setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ.setdefault("DJANGO_DEBUG", "0")
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-" + "k" * 40)
    sys.path.insert(0, str(REPO_ROOT))
    if not os.environ.get("REDIS_URL") or not os.environ.get("DATABASE_URL", "").startswith("postgres"):
        sys.exit("bench/drain_throughput.py needs DATABASE_URL (PostgreSQL) and REDIS_URL")
    from bench.lago_delivery import ensure_database

    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def trees(count: int) -> list[list[tuple[int, str]]]:
    """``count`` trees dbench-<i>: org -> proj -> key1, key2. Per tree: [(tenant pk, path)] of proj, key1, key2."""
    from tenants.models import Tenant
    from tenants.tree import create_tenant

    out = []
    for number in range(count):
        org = f"dbench-{number}"
        if not Tenant.objects.filter(external_id=org).exists():
            create_tenant(org, kind="organization")
            create_tenant(f"{org}-proj", parent=org)
            create_tenant(f"{org}-key1", parent=f"{org}-proj")
            create_tenant(f"{org}-key2", parent=f"{org}-proj")
        rows = Tenant.objects.filter(external_id__in=[f"{org}-proj", f"{org}-key1", f"{org}-key2"])
        out.append(sorted(rows.values_list("pk", "path")))
    return out


def fill(redis: Any, forest: list[list[tuple[int, str]]], entries: int) -> None:
    from metering import drain, log

    now = datetime.now(UTC)
    run = uuid.uuid4().hex[:8]
    roots = []
    for lineages in forest:
        root = int(lineages[0][1].strip("/").split("/")[0])
        roots.append(root)
        if not redis.exists(log.state_key(root)):
            drain.open_tree(root)
    epochs = {root: int(redis.hget(log.state_key(root), "epoch")) for root in roots}
    pipe = redis.pipeline(transaction=False)
    for number in range(entries):
        index = number % len(forest)
        tenant_pk, path = forest[index][number // len(forest) % 3]
        entry = log.Entry(
            tenant_pk=tenant_pk,
            path=path,
            feature="llm_tokens" if number % 4 else "embeddings",
            units=1_000 + number % 997,
            timestamp=now - timedelta(seconds=number % 10_800),
            transaction_id=f"{run}-{number}",
            recorded_at=now,
            epoch=epochs[roots[index]],
        )
        pipe.execute_command("XADD", log.stream_key(roots[index]), "*", *entry.encode())
        if len(pipe) >= 2000:
            pipe.execute()
    pipe.execute()
    redis.sadd(log.trees_key(), *roots)


class Timer:
    """Wall time per SQL statement kind (execute_wrapper) during the drain."""

    def __init__(self) -> None:
        self.sql: defaultdict[str, float] = defaultdict(float)

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            words = sql.split()
            kind = " ".join(words[:3]) if words else "?"
            if "usagerecord" in sql[:200]:
                kind = "INSERT facts"
            elif "usagerollup" in sql[:80]:
                kind = "UPSERT rollups"
            self.sql[kind] += time.perf_counter() - started


def measure(forest: list[list[tuple[int, str]]], entries: int, timer: Timer | None = None) -> tuple[float, int, float]:
    from django.db import connection

    from metering import counters, drain
    from metering.models import UsageRecord, UsageRollup
    from metering.rollups import exact_sum

    redis = counters.client()
    root_pks = [int(lineages[0][1].strip("/").split("/")[0]) for lineages in forest]
    facts_before = UsageRecord.objects.count()
    rolled_before = exact_sum(UsageRollup.objects.filter(tenant_id__in=root_pks))
    fill(redis, forest, entries)
    started, cpu_started = time.perf_counter(), time.process_time()
    if timer is not None:
        with connection.execute_wrapper(timer):
            report = drain.drain(delay=0)
    else:
        report = drain.drain(delay=0)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    assert report.facts == entries, report
    assert UsageRecord.objects.count() - facts_before == entries
    units = sum(1_000 + number % 997 for number in range(entries))
    assert exact_sum(UsageRollup.objects.filter(tenant_id__in=root_pks)) - rolled_before == units
    return entries / elapsed, report.batches, entries / cpu


def main() -> None:
    args = parse()
    setup_django()
    from django.conf import settings

    settings.METERING = {
        **settings.METERING,
        "WRITE_MODE": "log",
        "LOG_DRAIN_DELAY_SECONDS": 0,
        "LOG_DRAIN_BATCH": args.batch,
        "MAX_BACKDATE": None,
    }
    results: dict[str, Any] = {"entries": args.entries, "batch": args.batch, "runs": {}}
    for count in [int(part) for part in args.trees.split(",")]:
        forest = trees(count)
        measure(forest, min(2000, args.entries))  # warm-up
        rates, cpu_rates = [], []
        for _ in range(args.rounds - 1):
            rate, _, cpu_rate = measure(forest, args.entries)
            rates.append(rate)
            cpu_rates.append(cpu_rate)
        timer = Timer()
        rate, batches, cpu_rate = measure(forest, args.entries, timer)
        rates.append(rate)
        cpu_rates.append(cpu_rate)
        median = statistics.median(rates)
        cpu_median = statistics.median(cpu_rates)
        split = {kind: round(seconds, 3) for kind, seconds in sorted(timer.sql.items(), key=lambda item: -item[1])[:6]}
        results["runs"][str(count)] = {
            "facts_per_s": rates,
            "median": median,
            "facts_per_drainer_cpu_s": cpu_median,
            "batches": batches,
            "sql_s": split,
        }
        print(
            f"{count:>4} trees, {args.entries} entries, batch {args.batch}: median {median:,.0f} facts/s "
            f"(rounds: {', '.join(f'{r:,.0f}' for r in rates)}); per CPU second of the drainer process "
            f"{cpu_median:,.0f}; {batches} batches; SQL seconds {split}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
