"""Benchmark: does ``metering.roundtrip``'s BEGIN/COMMIT folding pay for itself? (commit mode, PostgreSQL + Redis)

Usage::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/xaas_bench REDIS_URL=redis://127.0.0.1:6379/12 \
        .venv/bin/python bench/fold_compare.py [--rounds 9] [--requests 300] [--warmup 100]

The same requests as ``bench/quota_throughput.py`` (in-process, sequential, API key identity), for the two
quota-enforced variants, each run three times per round: ``folded`` (``BEGIN`` sent with the first statements and
``COMMIT`` with the last: two round trips per fact), ``plain`` (``roundtrip._fold_begin`` answers False, so
psycopg sends ``BEGIN`` and Django ``COMMIT`` on their own: four round trips per fact) and ``single`` (no
multi-statement strings either: one round trip per statement, five per fact), interleaved, the order rotating
each round. Reported: median requests/s per variant, and the ratios to ``folded``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import quota_throughput as qt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    qt.setup_django()
    qt.ensure_database()
    qt.migrate()
    qt.ensure_tenants()
    client = qt.make_client(trusted_header=False)
    from metering import roundtrip

    folding, multi = roundtrip._fold_begin, roundtrip._binds_on_client

    def no(_connection: Any) -> bool:
        return False

    def run(name: str, kind: str) -> Callable[[int], float]:
        variant = qt.BY_NAME[name]

        def go(count: int) -> float:
            roundtrip._fold_begin = folding if kind == "folded" else no  # type: ignore[assignment]
            roundtrip._binds_on_client = no if kind == "single" else multi  # type: ignore[assignment]
            try:
                return qt.run_requests(client, variant, count)
            finally:
                roundtrip._fold_begin, roundtrip._binds_on_client = folding, multi

        return go

    variants = {
        f"{name}_{kind}": run(name, kind)
        for name in ("enforce_quota", "demo")
        for kind in ("folded", "plain", "single")
    }
    for go in variants.values():
        go(args.warmup)
    import time

    print("waiting out lineage tombstones (5 s)", flush=True)
    time.sleep(6)
    for go in variants.values():
        go(args.warmup)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for index in range(args.rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            rates[name].append(args.requests / variants[name](args.requests))
        print(f"round {index + 1}: " + "  ".join(f"{n} {rates[n][-1]:7.1f}" for n in names), flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in medians.items():
        print(f"{name:24s} median {value:8.1f} req/s  (min {min(rates[name]):.1f}, max {max(rates[name]):.1f})")
    for name in ("enforce_quota", "demo"):
        folded = medians[f"{name}_folded"]
        print(
            f"{name}: plain/folded = {medians[f'{name}_plain'] / folded:.3f}, "
            f"single/folded = {medians[f'{name}_single'] / folded:.3f}"
        )


if __name__ == "__main__":
    main()
