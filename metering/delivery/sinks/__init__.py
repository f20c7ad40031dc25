"""Delivery sinks: where the outbox sends facts. ``lago`` (Lago's batch events API), ``webhook`` (signed JSON)
and ``clickhouse`` (JSONEachRow inserts); a project's own is a ``Sink`` subclass named by its adapter's
``sink_class`` (a dotted path) or listed in ``METERING["SINKS"]``.

A sink turns claimed facts into its wire format and classifies each response into a ``SendResult``; the outbox
state machine in ``metering.delivery.deliver`` does the rest (marks, retries, dead letters, blocking).
"""

from __future__ import annotations

from .base import Outcome, SendResult, Sink, SinkNotConfigured, configured_sink_class, get_sink

__all__ = ["Outcome", "SendResult", "Sink", "SinkNotConfigured", "configured_sink_class", "get_sink"]
