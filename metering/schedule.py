"""The periodic tasks metering needs, as a Celery beat schedule a host project merges into its own.

Without the outbox sweep a sink (Lago, webhook) never receives the facts of a batch smaller than ``BATCH_SIZE``,
nor a due retry; without the log drain, log mode never persists its facts. ``quotas.schedule.beat_schedule()``
adds the quotas' own task: use that one in a project that installs ``quotas``. Import-light (no models), so a
settings module may call it.
"""

from __future__ import annotations

from typing import Any

SWEEP_TASK = "metering.sweep_outbox"
FOLD_TASK = "metering.fold_rollups"
DRAIN_TASK = "metering.drain_log"


def beat_schedule(
    *, sweep_seconds: float = 5.0, fold_seconds: float = 300.0, drain_seconds: float = 1.0
) -> dict[str, dict[str, Any]]:
    """``CELERY_BEAT_SCHEDULE`` entries of metering (run exactly one beat scheduler per site)."""
    return {
        # Delivers stragglers below BATCH_SIZE, retries that are due, facts whose tenant got a Lago subscription.
        "metering-sweep-outbox": {"task": SWEEP_TASK, "schedule": float(sweep_seconds)},
        # Rollup slots of hours that are over merge into one row per hour (metering.rollups.fold).
        "metering-fold-rollups": {"task": FOLD_TASK, "schedule": float(fold_seconds)},
        # Log mode: persist the Redis streams (a no-op in commit mode; `manage.py metering_drain` does it with
        # less latency as a long-running service).
        "metering-drain-log": {"task": DRAIN_TASK, "schedule": float(drain_seconds)},
    }
