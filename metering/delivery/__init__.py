"""Delivery: how a committed fact reaches a sink (Lago, a webhook, ClickHouse, a project's own).

- ``outbox``: one row per fact and sink (``METERING["SINKS"]``), written in the fact's own transaction; claims,
  marks, status, back-fill.
- ``deliver``: **where a fact leaves for a sink** — claim a batch, send it, mark each fact by the sink's answer.
- ``sinks``: the wire formats (``sinks.lago``, ``sinks.webhook``, ``sinks.clickhouse``; a project's own
  ``sinks.Sink`` subclass, named by its adapter's ``sink_class`` dotted path or in ``METERING["SINKS"]``).
- ``reconcile``: the facts against a sink's own totals (``reconcile_usage --sink clickhouse``).

The Celery tasks that run ``deliver.flush`` stay in ``metering.tasks`` (``metering.flush_outbox``,
``metering.sweep_outbox``: names beat schedules refer to). The operator signals and ``flush``/``resume`` are
importable from here.
"""

from __future__ import annotations

from .deliver import FlushReport, delivery_blocked, facts_dead_lettered, facts_held, flush, resume

__all__ = ["FlushReport", "delivery_blocked", "facts_dead_lettered", "facts_held", "flush", "resume"]
