"""The default adapter: facts and rollups in the project's database, hot counters in Redis when configured."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from asgiref.sync import sync_to_async

from tenants.context import TenantContext

from .. import recorder, usage
from ..events import UsageEvent


class DatabaseMeteringAdapter:
    """Implements ``MeteringProtocol`` on the Django ORM (the brief's usage-record table).

    Subclasses add work to the fact's transaction by overriding ``on_stored`` (an outbox row, say); every path
    that stores a fact goes through ``record_fact`` or, quota-enforced ones, ``fact_write``.
    """

    on_stored: recorder.StoredHook | None = None

    def record_fact(self, event: UsageEvent, *, context: TenantContext | None = None) -> int:
        """Store the fact (no decision); returns its id."""
        return recorder.record(event, context=context, on_stored=self.on_stored)

    def fact_write(self, event: UsageEvent, *, context: TenantContext | None = None) -> recorder.FactWrite:
        """The fact's write unit with this adapter's ``on_stored``, for a caller that decides inside the fact's
        transaction (``quotas.handler``): see ``metering.recorder``."""
        return recorder.FactWrite(event, context=context, on_stored=self.on_stored)

    def record_usage_sync(self, event: UsageEvent) -> None:
        self.record_fact(event)

    def get_usage_sync(
        self, tenant_id: str, feature_name: str, start_time: datetime | None, end_time: datetime | None
    ) -> Decimal:
        return usage.get_usage(tenant_id, feature_name, start_time, end_time)

    async def record_usage(self, event: UsageEvent) -> None:
        await sync_to_async(self.record_fact)(event)

    async def get_usage(
        self, tenant_id: str, feature_name: str, start_time: datetime | None, end_time: datetime | None
    ) -> Decimal:
        return await sync_to_async(usage.get_usage)(tenant_id, feature_name, start_time, end_time)
