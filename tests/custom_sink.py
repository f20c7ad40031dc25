"""A project's own sink and adapters, named by dotted path only (tests/metering/test_sink_by_path.py): nothing
registers them."""

from __future__ import annotations

from typing import Any

from metering.adapters.outbox import OutboxMeteringAdapter
from metering.delivery.sinks.base import SendResult, Sink
from metering.delivery.sinks.webhook import WebhookSink


class CollectorSink(WebhookSink):
    """The webhook wire format under a name of its own: its outbox rows say ``collector``."""

    name = "collector"


class CollectorAdapter(OutboxMeteringAdapter):
    sink_class = "tests.custom_sink.CollectorSink"


class NotASink:
    name = "not-a-sink"


class NamelessSink(Sink):
    def build(self, fact: Any) -> dict[str, Any]:  # pragma: no cover - never configured successfully
        return {}

    def send(self, events: list[dict[str, Any]]) -> SendResult:  # pragma: no cover
        raise NotImplementedError


class LongNameSink(NamelessSink):
    name = "a-name-longer-than-twenty"


class MissingSinkAdapter(OutboxMeteringAdapter):
    sink_class = "tests.custom_sink.NoSuchSink"


class NotASinkAdapter(OutboxMeteringAdapter):
    sink_class = "tests.custom_sink.NotASink"


class NamelessSinkAdapter(OutboxMeteringAdapter):
    sink_class = "tests.custom_sink.NamelessSink"


class LongNameSinkAdapter(OutboxMeteringAdapter):
    sink_class = "tests.custom_sink.LongNameSink"
