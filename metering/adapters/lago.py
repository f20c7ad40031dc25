"""``LagoMeteringAdapter``: usage recorded locally and pushed to Lago (getlago) in batches through Celery.

METERING = {
    "ADAPTER": "metering.adapters.lago.LagoMeteringAdapter",
    "SINK_URL": "https://api.getlago.com",  # Lago's base URL
    "API_KEY": "...",
    "BATCH_SIZE": 100,
}
"""

from __future__ import annotations

from .outbox import OutboxMeteringAdapter


class LagoMeteringAdapter(OutboxMeteringAdapter):
    sink_class = "metering.delivery.sinks.lago.LagoSink"
