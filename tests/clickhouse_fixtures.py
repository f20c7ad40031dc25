"""Fixtures of the ClickHouse tests: one real server per session (skipped without the binary, failed under CI)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests import services
from tests.clickhouse_server import ClickHouseServer, binary
from tests.clickhouse_support import clickhouse_metering

pytest_plugins = ["tests.lago_fixtures"]


@pytest.fixture(scope="session")
def clickhouse_server() -> Iterator[ClickHouseServer]:
    if binary() is None:  # a missing binary fails under CI=true (.ci/run installs it)
        (pytest.fail if services.in_ci() else pytest.skip)("clickhouse-server is not installed")
    server = ClickHouseServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clickhouse_db(clickhouse_server: ClickHouseServer) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    clickhouse_server.query(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def clickhouse(
    settings: Any, clickhouse_server: ClickHouseServer, clickhouse_db: str, private_queue: str, org: Any
) -> ClickHouseServer:
    from metering.delivery.sinks.clickhouse import ensure_schema

    settings.METERING = clickhouse_metering(clickhouse_server.url, clickhouse_db, CELERY_QUEUE=private_queue)
    ensure_schema()
    return clickhouse_server
