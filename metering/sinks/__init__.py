"""Delivery sinks: where the outbox sends facts. ``lago`` (Lago's batch events API) and ``webhook`` (signed JSON).

A sink turns claimed facts into its wire format and classifies each response into a ``SendResult``; the outbox
state machine in ``metering.delivery`` does the rest (marks, retries, dead letters, blocking).
"""

from __future__ import annotations

from .base import Outcome, SendResult, Sink, SinkNotConfigured, get_sink, sink_names

__all__ = ["Outcome", "SendResult", "Sink", "SinkNotConfigured", "get_sink", "sink_names"]
