"""``WebhookMeteringAdapter``: usage recorded locally and POSTed as signed JSON batches to ``SINK_URL``.

    METERING = {
        "ADAPTER": "metering.adapters.webhook.WebhookMeteringAdapter",
        "SINK_URL": "https://collector.internal/usage",
        "WEBHOOK_SECRET": "...",
    }

The wire format and the receiver's contract are in ``metering.delivery.sinks.webhook``.
"""

from __future__ import annotations

from .outbox import OutboxMeteringAdapter


class WebhookMeteringAdapter(OutboxMeteringAdapter):
    sink_class = "metering.delivery.sinks.webhook.WebhookSink"
