"""Timing comparisons for the oracle tests: interleaved rounds and medians, robust on a noisy shared machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(call: Callable[[str], object], names: list[str], rounds: int, *, skip: int = 0) -> list[float]:
    """The median seconds of ``call(name)`` for each of ``names``, over ``rounds`` rounds that alternate their order
    (so drift hits every name alike), leaving out each name's first ``skip`` samples (warm-up)."""
    timings: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(rounds):
        for name in names if round_number % 2 else list(reversed(names)):
            started = time.perf_counter()
            call(name)
            timings[name].append(time.perf_counter() - started)
    return [statistics.median(timings[name][skip:]) for name in names]


def ratio(values: list[float]) -> float:
    return max(values) / min(values)
