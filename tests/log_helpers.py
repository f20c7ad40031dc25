"""Writing log-mode stream entries exactly as the writer does (open the tree, XADD the entry, list the tree), and
checking facts == rollups, for the drainer's tests."""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from django.test import override_settings

from metering import counters, drain, log
from metering.models import UsageRecord, UsageRollup
from metering.windows import floor_hour
from tenants.models import Tenant

# The log-mode tests drive the drainer themselves: never the suite's eager drain (TEST_WRITE_MODE=log).
LOG_MODE = {"WRITE_MODE": "log", "LOG_DRAIN_DELAY_SECONDS": 0, "MAX_BACKDATE": None, "LOG_DRAIN_EAGER": False}
_serial = itertools.count(1)


def log_mode(**extra: Any) -> override_settings:
    from django.conf import settings

    return override_settings(METERING={**getattr(settings, "METERING", {}), **LOG_MODE, **extra})


def append(
    redis: Any,
    tenant_id: str,
    units: int = 1_000_000,
    *,
    feature: str = "llm_tokens",
    transaction_id: str | None = None,
    timestamp: datetime | None = None,
    count: bool = False,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Append one admitted fact of ``tenant_id`` to its tree's stream (as the log writer does) and return the
    entry id. ``count``: also add it to the existing live counters of its lineage, as the writer's script does."""
    tenant = Tenant.objects.get(external_id=tenant_id)
    lineage = tenant.ancestor_pks
    root = lineage[0]
    if not redis.exists(log.state_key(root)):
        drain.open_tree(root)
    epoch = int(redis.hget(log.state_key(root), "epoch"))
    now = datetime.now(UTC)
    entry = log.Entry(
        tenant_pk=tenant.pk,
        path=log.path_of(lineage),
        feature=feature,
        units=units,
        timestamp=timestamp or now,
        transaction_id=transaction_id or f"tx-{next(_serial)}-{now.timestamp()}",
        recorded_at=now,
        epoch=epoch,
        metadata=metadata or {},
    )
    fields = entry.encode()
    entry_id = redis.execute_command("XADD", log.stream_key(root), "*", *fields)
    if count:
        keys = counters.keys_for_fact(lineage, feature, entry.timestamp, epoch=epoch)
        counters.increment_existing(redis, keys, units)
    if redis.set(log.listed_key(root), 1, nx=True, ex=log.LISTED_SECONDS):
        redis.sadd(log.trees_key(), root)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def append_raw(redis: Any, root_pk: int, *fields: str) -> str:
    """An entry with arbitrary fields (a broken writer, a foreign tool)."""
    entry_id = redis.execute_command("XADD", log.stream_key(root_pk), "*", *fields)
    redis.sadd(log.trees_key(), root_pk)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def expected_rollups() -> dict[tuple[int, str, datetime], tuple[int, int]]:
    """Every level's hourly rollups as the facts say (by each tenant's current lineage)."""
    paths = dict(Tenant.objects.values_list("pk", "path"))
    totals: dict[tuple[int, str, datetime], list[int]] = defaultdict(lambda: [0, 0])
    for tenant_pk, feature, units, timestamp in UsageRecord.objects.values_list(
        "tenant_id", "feature", "units", "timestamp"
    ):
        for level in (int(part) for part in paths[tenant_pk].strip("/").split("/")):
            total = totals[(level, feature, floor_hour(timestamp))]
            total[0] += units
            total[1] += 1
    return {key: (units, events) for key, (units, events) in totals.items()}


def stored_rollups() -> dict[tuple[int, str, datetime], tuple[int, int]]:
    """The stored hourly rollups, summed over each hour's slot rows (PostgreSQL splits an hour, ``rollups``)."""
    totals: dict[tuple[int, str, datetime], list[int]] = defaultdict(lambda: [0, 0])
    for tenant, feature, bucket, units, events in UsageRollup.objects.values_list(
        "tenant_id", "feature", "bucket", "units", "events"
    ):
        total = totals[(tenant, feature, bucket)]
        total[0] += units
        total[1] += events
    return {key: (units, events) for key, (units, events) in totals.items() if (units, events) != (0, 0)}


def assert_facts_match_rollups() -> None:
    assert stored_rollups() == expected_rollups()
