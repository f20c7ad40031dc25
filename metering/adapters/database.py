"""The default adapter: facts and rollups in the project's database, hot counters in Redis when configured."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from asgiref.sync import sync_to_async

from .. import recorder, usage
from ..events import UsageEvent


class DatabaseMeteringAdapter:
    """Implements ``MeteringProtocol`` on the Django ORM (the brief's usage-record table)."""

    def record_usage_sync(self, event: UsageEvent) -> None:
        recorder.record(event)

    def get_usage_sync(
        self, tenant_id: str, feature_name: str, start_time: datetime | None, end_time: datetime | None
    ) -> Decimal:
        return usage.get_usage(tenant_id, feature_name, start_time, end_time)

    async def record_usage(self, event: UsageEvent) -> None:
        await sync_to_async(recorder.record)(event)

    async def get_usage(
        self, tenant_id: str, feature_name: str, start_time: datetime | None, end_time: datetime | None
    ) -> Decimal:
        return await sync_to_async(usage.get_usage)(tenant_id, feature_name, start_time, end_time)
