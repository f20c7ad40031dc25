"""Celery tasks of the outbox: ``flush_outbox`` (queued after commit once BATCH_SIZE facts are due) and
``sweep_outbox`` (beat, every few seconds: stragglers, due retries, facts whose tenant got a Lago subscription);
and of log mode: ``drain_log`` (beat, every second: persist the Redis streams, ``metering.drain``).

Both are idempotent (claims are leased, marks are conditional), so they are acknowledged late: a worker killed
mid-task has its message redelivered, and its claimed batch becomes due again when the lease runs out.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from celery import shared_task
from django.core.cache import caches

from tenants import namespace

from . import rollups
from .conf import metering_settings
from .delivery import deliver, outbox
from .delivery.sinks import get_sink
from .delivery.sinks.base import configured_sink_names

logger = logging.getLogger("metering.tasks")
FOLLOW_UP_KEY = "outbox:follow-up:v1:"  # in the site's namespace (tenants.namespace)


def _options() -> dict[str, Any]:
    queue = metering_settings.CELERY_QUEUE
    return {"queue": str(queue)} if queue else {}


def enqueue_flush(sink: str | None = None, countdown: float | None = None) -> None:
    """Queue a flush without retrying the publish (a caller must never hang on a broker that is down)."""
    options = _options()
    if countdown:
        options["countdown"] = countdown
    flush_outbox.apply_async(args=(sink,), retry=False, **options)


@shared_task(name="metering.flush_outbox", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def flush_outbox(sink: str | None = None) -> dict[str, Any]:
    report = deliver.flush(sink, max_batches=int(metering_settings.FLUSH_MAX_BATCHES))
    _follow_up(report)
    return report.as_dict()


@shared_task(name="metering.sweep_outbox", acks_late=True, ignore_result=True)
def sweep_outbox() -> dict[str, Any]:
    names = configured_sink_names()
    if not names:
        return {"sink": None}
    results = []
    for name in names:  # each sink on its own: one blocked or failing sink does not hold the others back
        sink = get_sink(name)
        assert sink is not None
        released = outbox.release_held(sink.name) if sink.needs_subscription else 0
        report = deliver.flush(sink.name, max_batches=int(metering_settings.FLUSH_MAX_BATCHES))
        _follow_up(report)
        results.append({**report.as_dict(), "released": released})
    return results[0] if len(results) == 1 else {"sinks": results}


@shared_task(name="metering.fold_rollups", acks_late=True, ignore_result=True)
def fold_rollups() -> dict[str, int]:
    """Beat: merge the rollup slots of hours that are over (``rollups.fold``; idempotent, exact beside writers)."""
    report = rollups.fold(using=metering_settings.DATABASE_ALIAS)
    return {"trees": report.trees, "rows_folded": report.rows_folded, "rows_left": report.rows_left}


def _follow_up(report: deliver.FlushReport) -> None:
    """More due after ``max_batches``: hand over to a fresh task. A transient failure: one task at the retry time
    (the sweep would get there too, this one honours a short Retry-After precisely)."""
    if report.sink is None or report.blocked or flush_outbox.app.conf.task_always_eager:
        return
    try:
        if report.more:
            enqueue_flush(report.sink)
        elif report.retry_in is not None:
            timeout = max(1, math.ceil(report.retry_in))
            if caches[metering_settings.CACHE_ALIAS].add(
                namespace.current().cache_key(FOLLOW_UP_KEY + report.sink), 1, timeout=timeout
            ):
                enqueue_flush(report.sink, countdown=report.retry_in)
    except Exception as error:  # the sweep covers it
        logger.warning("could not queue a follow-up flush (%s)", type(error).__name__)


@shared_task(name="metering.drain_log", acks_late=True, ignore_result=True)
def drain_log() -> dict[str, Any]:
    """Log mode: persist up to ``LOG_DRAIN_TASK_BATCHES`` batches of the streams, then hand over to a fresh task
    while full batches remain (entries still inside the durability delay wait for the next beat). Idempotent: a
    worker killed mid-batch committed nothing, and the next run redoes the batch."""
    from . import drain, log

    if not log.is_log_mode():
        return {"mode": log.mode()}
    report = drain.drain(budget=max(1, int(metering_settings.LOG_DRAIN_TASK_BATCHES)))
    if report.more and not drain_log.app.conf.task_always_eager:
        try:
            drain_log.apply_async(retry=False, **_options())
        except Exception as error:  # the beat runs it again anyway
            logger.warning("could not queue a follow-up drain (%s)", type(error).__name__)
    return report.as_dict()
