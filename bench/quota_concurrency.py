"""Benchmark: requests/s of the same endpoints as ``quota_throughput.py``, under concurrent load on a real server.

Usage (PostgreSQL and Redis required)::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench REDIS_URL=redis://127.0.0.1:6379/12 \
        .venv/bin/python bench/quota_concurrency.py [--workers 4] [--connections 8] [--seconds 5] [--rounds 3]

``quota_throughput.py`` sends one request at a time, so it measures each request's cost in wall time, where a
durable commit waits for the disk alone. A server under load runs many requests at once: PostgreSQL flushes the
WAL of several commits together (group commit), and the database and Redis work on one core while Python runs on
the other. Here gunicorn (``--workers`` processes, one thread each, keep-alive) serves ``bench.settings`` on
127.0.0.1, and one client process keeps ``--connections`` keep-alive connections busy (asyncio, raw HTTP/1.1) for
``--seconds`` per variant; each of ``--rounds`` rounds runs every variant in turn, the starting one rotating. The
client shares the machine's cores with everything else, alike for every variant.

Same tenants, limits and views as ``quota_throughput.py`` (``bench/bench_urls.py``). Reported: the median
requests/s per variant, the cost multiple against the bare view, and the rate against django-ratelimit's.
Results: a table on stdout and ``bench/results/quota_concurrency.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "quota_concurrency.json"
VARIANTS = {
    "bare": "/bench/bare",
    "demo": "/demo/completions",
    "enforce_quota": "/bench/enforce-quota",
    "ratelimit": "/bench/ratelimit",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="gunicorn worker processes (default 4)")
    parser.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections (default 8)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per variant per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    args = parser.parse_args()
    if args.workers < 1 or args.connections < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--workers, --connections, --seconds and --rounds must be positive")
    return args


def prepare() -> None:
    """Create and migrate the database, and the qbench tenants and limits (shared with quota_throughput.py)."""
    sys.path.insert(0, str(REPO_ROOT))
    from bench import quota_throughput

    quota_throughput.setup_django()
    quota_throughput.ensure_database()
    quota_throughput.migrate()
    quota_throughput.ensure_tenants()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(workers: int, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "bench-only-" + "k" * 40,
        "PYTHONPATH": str(REPO_ROOT),
    }
    command = [
        str(Path(sys.executable).parent / "gunicorn"),
        "project.wsgi:application",
        f"--bind=127.0.0.1:{port}",
        f"--workers={workers}",
        "--worker-class=gthread",
        "--threads=1",
        "--keep-alive=30",
        "--log-level=warning",
    ]
    server = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("gunicorn did not start within 30 s")


def request_bytes(path: str, port: int) -> bytes:
    from bench.quota_throughput import BODY, KEY_ID

    body = BODY.encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"X-Tenant-ID: {KEY_ID}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _connection(port: int, payload: bytes, stop_at: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < stop_at:
            writer.write(payload)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            if not status_line.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"{status_line!r}: {body[:300]!r}")
            counts[0] += 1
    finally:
        writer.close()


async def _drive(port: int, path: str, connections: int, seconds: float) -> float:
    payload = request_bytes(path, port)
    counts = [0]
    started = time.monotonic()
    stop_at = started + seconds
    await asyncio.gather(*(_connection(port, payload, stop_at, counts) for _ in range(connections)))
    return counts[0] / (time.monotonic() - started)


def drive(port: int, path: str, connections: int, seconds: float) -> float:
    return asyncio.run(_drive(port, path, connections, seconds))


def main() -> None:
    args = parse_args()
    prepare()
    port = free_port()
    server = start_server(args.workers, port)
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    started_at = datetime.now(UTC)
    try:
        for path in VARIANTS.values():  # warm every worker: connections, caches, counters
            drive(port, path, args.connections, 1.0)
        print(f"gunicorn: {args.workers} workers; {args.connections} connections; {args.seconds} s per variant")
        for round_index in range(args.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                rates[name].append(drive(port, VARIANTS[name], args.connections, args.seconds))
            line = "  ".join(f"{name} {rates[name][-1]:7.1f}" for name in names)
            print(f"round {round_index + 1}/{args.rounds}: {line}  (req/s)", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    bare = statistics.median(rates["bare"])
    ratelimit = statistics.median(rates["ratelimit"])
    results: dict[str, Any] = {}
    print(f"\n{'variant':<16} {'req/s med':>10} {'min':>8} {'max':>8} {'bare/x':>7} {'x/ratelimit':>12}")
    for name in names:
        median = statistics.median(rates[name])
        results[name] = {
            "path": VARIANTS[name],
            "rps_per_round": [round(rate, 1) for rate in rates[name]],
            "rps_median": round(median, 1),
            "cost_multiple_vs_bare": round(bare / median, 2),
            "rate_vs_django_ratelimit": round(median / ratelimit, 3),
        }
        print(
            f"{name:<16} {median:>10.1f} {min(rates[name]):>8.1f} {max(rates[name]):>8.1f} "
            f"{bare / median:>7.2f} {median / ratelimit:>12.2f}"
        )
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(
        json.dumps(
            {
                "benchmark": "quota_concurrency",
                "command": " ".join([".venv/bin/python", "bench/quota_concurrency.py", *sys.argv[1:]]),
                "started_at": started_at.isoformat(),
                "config": vars(args),
                "cpus": os.cpu_count(),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {RESULTS_PATH.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
