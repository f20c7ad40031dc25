"""Fixtures of the delivery tests. Test modules load them with ``pytest_plugins = ["tests.lago_fixtures"]``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tenants.models import Tenant
from tests.factories import tree
from tests.lago_server import FakeCollector, FakeLago
from tests.lago_support import API_KEY, ORG, REFUSED, WEBHOOK_SECRET, delete_queue, lago_metering


@pytest.fixture
def lago() -> Iterator[FakeLago]:
    with FakeLago(API_KEY, refuse_codes={REFUSED: "undefined variable 'x'"}) as server:
        yield server


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector(WEBHOOK_SECRET) as server:
        yield server


@pytest.fixture
def private_queue(settings: Any) -> Iterator[str]:
    """A queue of our own on a real broker, so the after-commit trigger never reaches anyone else's worker."""
    from project.celery import app

    name = f"lago-test-{uuid.uuid4().hex[:12]}"
    yield name
    if not app.conf.task_always_eager:
        delete_queue(name)


@pytest.fixture
def lago_settings(settings: Any, lago: FakeLago, private_queue: str) -> FakeLago:
    settings.METERING = lago_metering(lago.url, CELERY_QUEUE=private_queue)
    return lago


@pytest.fixture
def org() -> dict[str, Tenant]:
    """org (subscription sub-org) > proj > key1, key2 (inherit it); other: no subscription anywhere."""
    tenants = tree(ORG)
    Tenant.objects.filter(external_id="org").update(lago_subscription_id="sub-org")
    return tenants
