"""Benchmark: bulk ingest on PostgreSQL — REST batches, ``usage_import``, and the raw multi-row INSERT floor.

Usage (PostgreSQL required; Redis optional, for the live counters; the database is created if missing, migrated)::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench REDIS_URL=redis://127.0.0.1:6379/12 \
        .venv/bin/python bench/bulk_ingest.py [--batches 40] [--import-events 200000] [--rounds 2]

In one run, each of ``--rounds`` rounds measures, in this order:

- ``rest_spread``: ``POST /api/v1/events`` with batches of 1,000 events under gunicorn (``--workers`` 4, sync
  workers) driven by ``--clients`` 4 client threads on keep-alive connections, ``--batches`` requests in all; each
  request is one of 100 trees (its org key), its events spread over the tree's project and 2 keys, 2 features,
  timestamps over the last 3 hours. Bodies are encoded before the clock starts.
- ``rest_one_tree``: the same, every request in one tree.
- ``import``: ``manage.py usage_import`` of a JSON Lines file of ``--import-events`` events over the 100 trees
  (a subprocess, timed end to end: Django start-up included).
- ``raw_insert``: the floor: the same kind of rows with plain multi-row ``INSERT ... VALUES`` (1,000 rows per
  statement and transaction, no idempotency, no rollups, no counters), in this process;
- ``raw_copy``: the same rows with a plain ``COPY`` straight into the facts table (1,000 per transaction).

Every response is checked (201, 1,000 created) and so is the facts count afterwards. Reported: events/s per
variant (median over rounds) and each variant's ratio to the raw floor. Results: stdout and
``bench/results/bulk_ingest.json``. Tenants ``bbench-*`` are created once and reused; facts accumulate.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "bulk_ingest.json"
TREES = 100
BATCH = 1000


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40, help="REST requests of 1,000 events per variant")
    parser.add_argument("--import-events", type=int, default=200_000)
    parser.add_argument("--raw-events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    return parser.parse_args()


def setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ.setdefault("DJANGO_DEBUG", "0")
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-" + "k" * 40)
    sys.path.insert(0, str(REPO_ROOT))
    if not os.environ.get("DATABASE_URL", "").startswith("postgres"):
        sys.exit("bench/bulk_ingest.py needs DATABASE_URL (PostgreSQL)")
    from bench.lago_delivery import ensure_database

    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def ensure_tenants() -> list[tuple[str, list[str]]]:
    """100 trees org -> project -> 2 keys; returns [(org API key plaintext, [tenant ids that get facts])]."""
    from tenants.apikeys import create_api_key
    from tenants.models import Tenant
    from tenants.tree import create_tenant

    trees = []
    for index in range(TREES):
        org = f"bbench-{index}"
        leaves = [f"{org}-p", f"{org}-p-k1", f"{org}-p-k2"]
        if not Tenant.objects.filter(external_id=org).exists():
            create_tenant(org, kind="organization")
            create_tenant(leaves[0], parent=org)
            create_tenant(leaves[1], parent=leaves[0])
            create_tenant(leaves[2], parent=leaves[0])
        trees.append((create_api_key(org, name="bench")[1], leaves))
    return trees


def events_for(leaves: list[str], count: int, now: datetime) -> list[dict[str, Any]]:
    run = uuid.uuid4().hex[:12]
    return [
        {
            "tenant_id": leaves[i % 3],
            "feature_name": ("llm_tokens", "api_calls")[i % 2],
            "quantity": str(1 + i % 7),
            "timestamp": (now - timedelta(seconds=(i * 7) % 10_800)).isoformat(),
            "transaction_id": f"{run}-{i}",
        }
        for i in range(count)
    ]


def facts() -> int:
    from metering.models import UsageRecord

    return UsageRecord.objects.count()


def start_server(workers: int, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [
        str(Path(sys.executable).parent / "gunicorn"),
        "project.wsgi:application",
        f"--bind=127.0.0.1:{port}",
        f"--workers={workers}",
        "--keep-alive=30",
        "--timeout=120",
        "--log-level=warning",
    ]
    server = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/api/v1/")
            connection.getresponse().read()
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("gunicorn did not start within 60 s")


def rest(port: int, bodies: list[tuple[str, bytes]], clients: int) -> float:
    """Send every (key, body) with ``clients`` threads; returns events/s. Each answer must be 201 with 1,000."""
    todo = list(enumerate(bodies))
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                if not todo:
                    return
                _, (key, body) = todo.pop()
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
            connection.request("POST", "/api/v1/events", body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            if response.status != 201 or json.loads(answer).get("created") != BATCH:
                errors.append(f"{response.status}: {answer[:300]!r}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
    return len(bodies) * BATCH / seconds


def run_import(trees: list[tuple[str, list[str]]], count: int, now: datetime) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
        per_tree = max(1, count // TREES)
        for _, leaves in trees:
            for event in events_for(leaves, per_tree, now):
                handle.write(json.dumps(event) + "\n")
        path = handle.name
    total = per_tree * TREES
    try:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "manage.py", "usage_import", path, "--json", "--no-progress", "--batch-size", "5000"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - started
    finally:
        os.unlink(path)
    if done.returncode != 0:
        raise SystemExit(f"usage_import failed: {done.stderr[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    if summary["imported"] != total:
        raise SystemExit(f"usage_import imported {summary['imported']} of {total}")
    return total / seconds


def raw_insert(trees: list[tuple[str, list[str]]], count: int, now: datetime, *, copy: bool = False) -> float:
    """The floor: plain multi-row INSERTs of the same kind of rows, 1,000 per statement and transaction (``copy``:
    a plain ``COPY`` of 1,000 rows per transaction straight into the facts table instead)."""
    from django.db import connection, transaction

    from metering.models import UsageRecord
    from tenants.models import Tenant

    pks = dict(Tenant.objects.filter(external_id__startswith="bbench-").values_list("external_id", "pk"))
    table = connection.ops.quote_name(UsageRecord._meta.db_table)
    columns = "tenant_id, feature, units, timestamp, transaction_id, metadata, recorded_at"
    rows: list[list[Any]] = []
    per_tree = max(1, count // TREES)
    for _, leaves in trees:
        for event in events_for(leaves, per_tree, now):
            rows.append(
                [
                    pks[event["tenant_id"]],
                    event["feature_name"],
                    int(event["quantity"]) * 1_000_000,
                    datetime.fromisoformat(event["timestamp"]),
                    event["transaction_id"],
                    "{}",
                    now,
                ]
            )
    started = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        part = rows[start : start + BATCH]
        if copy:
            with transaction.atomic(), connection.cursor() as cursor:
                _copy_rows(cursor, table, columns, part)
            continue
        values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * len(part))
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({columns}) VALUES {values}",
                [value for row in part for value in row],
            )
    return len(rows) / (time.perf_counter() - started)


def _copy_rows(cursor: Any, table: str, columns: str, rows: list[list[Any]]) -> None:
    with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as stream:
        for row in rows:
            stream.write_row(row)


def main() -> None:
    args = parse()
    setup_django()
    from django.db import connection

    from bench.quota_concurrency import free_port

    trees = ensure_tenants()
    connection.close()
    port = free_port()
    server = start_server(args.workers, port)
    rates: dict[str, list[float]] = {
        "rest_spread": [],
        "rest_one_tree": [],
        "import": [],
        "raw_insert": [],
        "raw_copy": [],
    }
    try:
        for round_number in range(1, args.rounds + 1):
            now = datetime.now(UTC)
            before = facts()
            spread = [
                (trees[i % TREES][0], json.dumps({"events": events_for(trees[i % TREES][1], BATCH, now)}).encode())
                for i in range(args.batches)
            ]
            rates["rest_spread"].append(rest(port, spread, args.clients))
            one = [
                (trees[0][0], json.dumps({"events": events_for(trees[0][1], BATCH, now)}).encode())
                for _ in range(args.batches)
            ]
            rates["rest_one_tree"].append(rest(port, one, args.clients))
            if facts() != before + 2 * args.batches * BATCH:
                raise SystemExit("the REST runs did not store exactly the events sent")
            connection.close()
            rates["import"].append(run_import(trees, args.import_events, now))
            rates["raw_insert"].append(raw_insert(trees, args.raw_events, now))
            rates["raw_copy"].append(raw_insert(trees, args.raw_events, now, copy=True))
            connection.close()
            print(f"round {round_number}: " + ", ".join(f"{name} {values[-1]:,.0f}" for name, values in rates.items()))
    finally:
        server.terminate()
        server.wait(timeout=30)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    floor = medians["raw_insert"]
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "events_per_second": {name: round(value) for name, value in medians.items()},
        "rounds": {name: [round(value) for value in values] for name, values in rates.items()},
        "ratio_to_raw_insert": {name: round(value / floor, 3) for name, value in medians.items()},
        "redis": bool(os.environ.get("REDIS_URL")),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    for name, value in medians.items():
        print(f"{name:14} median {value:10,.0f} events/s   {value / floor:5.2f}x the raw INSERT floor")


if __name__ == "__main__":
    main()
