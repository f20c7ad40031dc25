"""A separate OS process that hammers quotas (spawned by test_quota_hammer)."""

from __future__ import annotations

import os
import random
from typing import Any


def hammer(
    database: dict[str, Any], redis_url: str | None, seed: int, requests: int, write_mode: str = "commit"
) -> dict[str, int]:
    # The example site's settings: they read METERING_WRITE_MODE and REDIS_URL (the suite's own do not).
    os.environ["DJANGO_SETTINGS_MODULE"] = "project.settings"
    os.environ.pop("REDIS_URL", None)
    os.environ["METERING_WRITE_MODE"] = write_mode
    if redis_url:
        os.environ["REDIS_URL"] = redis_url
    import django

    django.setup()
    from django.conf import settings

    # Point at the test database the parent created (before any connection is opened).
    settings.DATABASES["default"].update(NAME=database["NAME"])
    from quotas.exceptions import QuotaExceeded
    from quotas.handler import QuotaPolicyHandler

    rng = random.Random(seed)
    admitted: dict[str, int] = {}
    for index in range(requests):
        project = "p1" if index % 2 == 0 else "p2"
        key = f"{project}-k{rng.randint(1, 2)}"
        for feature in ("org_bound", "project_bound"):
            try:
                QuotaPolicyHandler(key).consume(feature, 1)
            except QuotaExceeded:
                continue
            admitted[f"{feature}:{project}"] = admitted.get(f"{feature}:{project}", 0) + 1
    from django.db import connections

    connections.close_all()
    return admitted


def drainer(database: dict[str, Any], redis_url: str, stop: Any) -> int:
    """Log mode: drain every tree's stream until ``stop`` is set, then once more until nothing is left (in the
    workers' own configuration, so the same Redis namespace). Returns the facts persisted."""
    # The example site's settings: they read METERING_WRITE_MODE and REDIS_URL (the suite's own do not).
    os.environ["DJANGO_SETTINGS_MODULE"] = "project.settings"
    os.environ["REDIS_URL"] = redis_url
    os.environ["METERING_WRITE_MODE"] = "log"
    import django

    django.setup()
    from django.conf import settings

    settings.DATABASES["default"].update(NAME=database["NAME"])
    settings.METERING["LOG_DRAIN_DELAY_SECONDS"] = 0
    from django.db import connections

    from metering import drain

    persisted = 0
    while not stop.wait(0.02):
        persisted += drain.drain().facts
    while True:
        report = drain.drain()
        persisted += report.facts
        if report.entries == 0 and not drain.pending()["entries"]:
            break
    connections.close_all()
    return persisted
