"""Sink reconciliation: the facts table against ClickHouse's totals, per tenant x feature x UTC day (``FINAL``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date
from typing import Any

from django.db.models import Count, Sum
from django.db.models.functions import TruncDate

from ..conf import metering_settings
from ..models import UsageRecord
from .sinks.clickhouse import ClickHouseSink, table_name

Key = tuple[str, str, date]


@dataclass(frozen=True)
class SinkDifference:
    tenant_id: str
    feature: str
    day: date
    facts_units: int
    facts_events: int
    sink_units: int
    sink_events: int


def facts_totals() -> dict[Key, tuple[int, int]]:
    rows = (
        UsageRecord.objects.using(str(metering_settings.DATABASE_ALIAS))
        .annotate(day=TruncDate("timestamp", tzinfo=UTC))
        .values_list("tenant__external_id", "feature", "day")
        .annotate(units=Sum("units"), events=Count("id"))
        .order_by()
    )
    return {(tenant_id, feature, day): (int(units), int(events)) for tenant_id, feature, day, units, events in rows}


def clickhouse_totals(sink: ClickHouseSink | None = None) -> dict[Key, tuple[int, int]]:
    sink = sink or ClickHouseSink()
    # FINAL: a row resent after a lost answer is counted once even before the background merge removes it.
    # A Decimal128 sum: an Int64 sum could wrap (ClickHouse 18.16 has no Int128); its text is exact.
    columns = "tenant_id, feature, toDate(timestamp) AS day, toString(sum(toDecimal128(units, 0))) AS units"
    table = table_name()  # checked identifiers only
    sql = f"SELECT {columns}, count() AS events FROM {table} FINAL GROUP BY tenant_id, feature, day"  # noqa: S608
    return _parse(sink.query(sql + " FORMAT JSONEachRow"))


def _parse(text: str) -> dict[Key, tuple[int, int]]:
    totals: dict[Key, tuple[int, int]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        totals[(row["tenant_id"], row["feature"], date.fromisoformat(row["day"]))] = (
            int(row["units"]),
            int(row["events"]),
        )
    return totals


def compare(facts: dict[Key, tuple[int, int]], sink: dict[Key, tuple[int, int]]) -> list[SinkDifference]:
    differences = []
    for key in sorted(set(facts) | set(sink)):
        mine, theirs = facts.get(key, (0, 0)), sink.get(key, (0, 0))
        if mine != theirs:
            differences.append(SinkDifference(*key, mine[0], mine[1], theirs[0], theirs[1]))
    return differences


def reconcile_clickhouse(**kwargs: Any) -> list[SinkDifference]:
    return compare(facts_totals(), clickhouse_totals(**kwargs))
