from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from django.core.cache import caches
from django.db import connection
from django.test import override_settings

from tests import services


def require(service: str) -> None:
    """Skip when ``service`` is unreachable; under CI=true an unreachable service fails the test instead."""
    if services.reachable(service):
        return
    message = f"{service} is unreachable at {services.url(service)}"
    if services.in_ci():
        pytest.fail(f"{message} (CI=true: a needed service must be up)")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    # Cached lineages must not outlive the test database rows they describe.
    _clear_caches()
    yield
    _clear_caches()


def _clear_caches() -> None:
    from quotas.rules import forget_local

    forget_local()  # rule caches in this process are checked against Redis tokens, which another test may reuse
    for cache in caches.all():
        # A test may point a cache at a server that is down on purpose.
        with contextlib.suppress(Exception):
            cache.clear()


@pytest.fixture
def redis_cache() -> Iterator[object]:
    """Make the metering cache a real django-redis cache (whatever the configuration) and yield its client."""
    require("redis")
    from django_redis import get_redis_connection

    config = {
        "default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": services.url("redis")},
    }
    with override_settings(CACHES=config):
        caches["default"].clear()
        client = get_redis_connection("default")
        client.flushdb()
        yield client
        client.flushdb()


@pytest.fixture
def on_postgres() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("runs in the PostgreSQL configuration (make test runs both)")
