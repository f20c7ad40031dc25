"""A separate OS process that records facts into one tree (spawned by test_rollup_slots): its own connection, so
its transactions take their own rollup slots beside the other processes' and the test's fold."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from typing import Any


def write(database: dict[str, Any], keys: list[str], seed: int, facts: int, backdate_hours: int) -> dict[str, int]:
    """Record ``facts`` facts for random ``keys``; one in four is dated up to ``backdate_hours`` back (an hour the
    fold is merging). Returns units written per key (every fact's quantity is a random integer of units)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ.pop("REDIS_URL", None)  # facts and rollups only: the database is what is checked
    import django

    django.setup()
    from django.conf import settings

    settings.DATABASES["default"].update(NAME=database["NAME"])  # the parent's test database
    from metering import UsageEvent, get_meter
    from metering.events import units_to_quantity

    rng = random.Random(seed)
    meter = get_meter()
    written: dict[str, int] = {}
    for index in range(facts):
        key = rng.choice(keys)
        units = rng.choice([1, 999_999, 10**12 + rng.randint(0, 10**6)])
        moment = datetime.now(UTC)
        if index % 4 == 0 and backdate_hours:
            moment -= timedelta(hours=rng.randint(1, backdate_hours), minutes=rng.randint(0, 59))
        meter.record_usage_sync(
            UsageEvent(key, "llm_tokens", units_to_quantity(units), moment, transaction_id=f"w{seed}-{index}")
        )
        written[key] = written.get(key, 0) + units
    from django.db import connections

    connections.close_all()
    return written
