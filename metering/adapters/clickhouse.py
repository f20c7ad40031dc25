"""``ClickHouseMeteringAdapter``: usage recorded locally and every fact inserted into ClickHouse in large batches.

    METERING = {
        "ADAPTER": "metering.adapters.clickhouse.ClickHouseMeteringAdapter",
        "CLICKHOUSE_URL": "http://clickhouse.internal:8123",
        "CLICKHOUSE_PASSWORD": "...",
    }

The table, the queries and the exactly-once argument are in docs/clickhouse.md.
"""

from __future__ import annotations

from .outbox import OutboxMeteringAdapter


class ClickHouseMeteringAdapter(OutboxMeteringAdapter):
    sink_class = "metering.delivery.sinks.clickhouse.ClickHouseSink"
