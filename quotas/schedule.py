"""The periodic tasks of the whole stack (metering's and the quotas'), as one Celery beat schedule::

    # settings.py of a host project
    from quotas.schedule import beat_schedule

    CELERY_BEAT_SCHEDULE = {**beat_schedule(), **CELERY_BEAT_SCHEDULE_OF_YOUR_OWN}

Import-light (no models), so a settings module may call it.
"""

from __future__ import annotations

from typing import Any

from metering.schedule import beat_schedule as metering_beat_schedule

EXPIRE_TASK = "quotas.expire_reservations"
PRUNE_REFUSALS_TASK = "quotas.prune_refusals"


def beat_schedule(
    *,
    sweep_seconds: float = 5.0,
    fold_seconds: float = 300.0,
    drain_seconds: float = 1.0,
    expiry_seconds: float = 30.0,
) -> dict[str, dict[str, Any]]:
    """metering's entries (``metering.schedule.beat_schedule``) plus the expiry of abandoned reservations and the
    hourly pruning of the dashboard's refusal counts (``quotas.refusals.KEEP``)."""
    schedule = metering_beat_schedule(
        sweep_seconds=sweep_seconds, fold_seconds=fold_seconds, drain_seconds=drain_seconds
    )
    # Reservations whose holder died give their quota back at every level.
    schedule["quotas-expire-reservations"] = {"task": EXPIRE_TASK, "schedule": float(expiry_seconds)}
    schedule["quotas-prune-refusals"] = {"task": PRUNE_REFUSALS_TASK, "schedule": 3600.0}
    return schedule
