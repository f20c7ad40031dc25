"""Helpers of the ClickHouse tests (settings), importable by test modules and fixtures alike."""

from __future__ import annotations

from typing import Any

from tests.clickhouse_server import PASSWORD, USER
from tests.lago_support import lago_metering


def clickhouse_metering(url: str, database: str, **overrides: Any) -> dict[str, Any]:
    return {
        **lago_metering(url),
        "ADAPTER": "metering.adapters.clickhouse.ClickHouseMeteringAdapter",
        "SINK_URL": None,
        "API_KEY": None,
        "CLICKHOUSE_URL": url,
        "CLICKHOUSE_DATABASE": database,
        "CLICKHOUSE_USER": USER,
        "CLICKHOUSE_PASSWORD": PASSWORD,
        "CLICKHOUSE_BATCH_SIZE": 10,
        "SINK_TIMEOUT_SECONDS": 5,
        "SINK_LEASE_SECONDS": 15,
        **overrides,
    }
