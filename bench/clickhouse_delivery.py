"""Benchmark: events/s delivered from the outbox to a real ClickHouse server, one worker (``flush()`` in this
process, one thread), batches of 100, 1,000 and 10,000 rows per INSERT.

Usage (PostgreSQL; the database is created if missing and migrated; its bench rows are replaced on every run)::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench_ch .venv/bin/python bench/clickhouse_delivery.py \
        [--events 50000] [--repeat 3] [--batches 100,1000,10000]

What runs: ``clickhouse-server`` of its own (``tests/clickhouse_server.py``: free loopback ports, a temporary data
directory), the table made by ``ensure_schema``, and the outbox filled with ``--events`` facts of one organization
with 50 keys (inserted in bulk: recording speed is not what is measured). Per round the clock runs from the first
claim until every row is ``delivered``. After each round ClickHouse must hold every fact exactly once (``FINAL``)
or the run fails. Results are printed and written to ``bench/results/clickhouse_delivery.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lago_delivery import REPO_ROOT, setup_django

RESULTS_PATH = REPO_ROOT / "bench" / "results" / "clickhouse_delivery.json"
ORG_ID = "bench-lago-org"  # the Lago benchmark's tenants: reset_outbox creates and empties them


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000, help="facts per round (default 50,000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per batch size (default 3); median reported")
    parser.add_argument("--batches", default="100,1000,10000", help="batch sizes (default 100,1000,10000)")
    args = parser.parse_args()
    args.batch_sizes = [int(size) for size in args.batches.split(",")]
    if min(args.events, args.repeat, *args.batch_sizes) < 1:
        parser.error("--events, --repeat and the batch sizes must be positive")
    return args


def settings_for(url: str, database: str, batch_size: int) -> dict[str, Any]:
    return {
        "ADAPTER": "metering.adapters.clickhouse.ClickHouseMeteringAdapter",
        "CLICKHOUSE_URL": url,
        "CLICKHOUSE_DATABASE": database,
        "CLICKHOUSE_BATCH_SIZE": batch_size,
        "FLUSH_MAX_BATCHES": 1_000_000,
        "SINK_TIMEOUT_SECONDS": 60,
        "SINK_LEASE_SECONDS": 600,
    }


def fill(events: int, round_id: str) -> None:
    from bench.lago_delivery import reset_outbox
    from metering.models import UsageOutbox

    reset_outbox(events, round_id)  # facts with "lago" rows: re-labelled for this sink
    UsageOutbox.objects.filter(sink="lago").update(sink="clickhouse")


def main() -> None:
    args = parse_args()
    setup_django()
    from django.test import override_settings

    from metering.delivery.deliver import flush
    from metering.delivery.sinks.clickhouse import ensure_schema
    from tests.clickhouse_server import ClickHouseServer

    results: dict[str, Any] = {}
    with ClickHouseServer() as server:
        print(f"clickhouse-server {server.query('SELECT version()').strip()} at {server.url}")
        for batch_size in args.batch_sizes:
            rates = []
            for _ in range(args.repeat):
                database = f"bench_{uuid.uuid4().hex[:8]}"
                with override_settings(METERING=settings_for(server.url, database, batch_size)):
                    ensure_schema()
                    fill(args.events, uuid.uuid4().hex[:8])
                    started = time.perf_counter()
                    report = flush()
                    elapsed = time.perf_counter() - started
                stored = server.query(f"SELECT count() FROM {database}.usage_facts FINAL").strip()
                if report.delivered != args.events or stored != str(args.events):
                    sys.exit(f"batch {batch_size}: delivered {report.delivered}, ClickHouse holds {stored}")
                server.query(f"DROP DATABASE {database}")
                rates.append(args.events / elapsed)
                print(f"  batch {batch_size:>6}: {args.events / elapsed:>10,.0f} events/s ({elapsed:.2f}s)")
            results[str(batch_size)] = {"median_events_per_s": round(statistics.median(rates)), "rounds": rates}
            print(f"batch {batch_size:>6}: median {statistics.median(rates):,.0f} events/s")
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(),
                "events": args.events,
                "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
