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
    from metering.appender import forget_snapshots
    from quotas.rules import forget_local

    forget_snapshots()  # log mode's lineage snapshots describe rows of the previous test's database
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


@pytest.fixture
def redis_server() -> Iterator[object]:
    """A redis-server of the test's own (AOF on, so a restart keeps its data) as the metering cache, with 0.3 s
    socket timeouts and a 0.5 s breaker cool-down: for outage tests that stop, hang or flush it."""
    import shutil

    from metering.breaker import reset_all
    from tests.faults import RedisServer, breaker_cache

    if shutil.which("redis-server") is None:  # a missing binary fails under CI=true, like an unreachable service
        (pytest.fail if services.in_ci() else pytest.skip)("redis-server is not installed")
    with RedisServer(appendonly=True) as server:
        reset_all()
        with override_settings(CACHES=breaker_cache(server.url, timeout=0.3, cooldown=0.5)):
            yield server
        reset_all()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``TEST_WRITE_MODE=log``: deselect the tests of commit mode's own mechanism (``@pytest.mark.commit_mode``);
    each such marker must give the reason, naming the log-mode test of the same guarantee."""
    from django.conf import settings

    for item in items:
        marker = item.get_closest_marker("commit_mode")
        if marker is not None and not (marker.args and str(marker.args[0]).strip()):
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.commit_mode needs a reason")
    if getattr(settings, "WRITE_MODE", "commit") != "log":
        return
    kept = [item for item in items if item.get_closest_marker("commit_mode") is None]
    deselected = [item for item in items if item.get_closest_marker("commit_mode") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def pytest_configure(config: pytest.Config) -> None:
    """This process's write mode is read (tests/settings.py); processes a test starts keep their own mode (commit,
    or what the test gives them), not the run's ``TEST_WRITE_MODE``."""
    import os

    from django.conf import settings

    if settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE"):
        getattr(settings, "METERING", None)  # loads tests.settings while TEST_WRITE_MODE is still set
    os.environ.pop("TEST_WRITE_MODE", None)
