"""The default adapter: facts and rollups in the project's database, hot counters in Redis when configured."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async

from tenants.context import TenantContext

from .. import appender, bulk, log, recorder, usage
from ..events import UsageEvent, validate_event

if TYPE_CHECKING:
    from ..bulk import StoredFact


class DatabaseMeteringAdapter:
    """Implements ``MeteringProtocol`` on the Django ORM (the brief's usage-record table).

    Subclasses add work to the fact's transaction by overriding ``on_stored`` (an outbox row, say); every path
    that stores a fact goes through ``record_fact`` or, quota-enforced ones, ``fact_write``.
    """

    on_stored: recorder.StoredHook | None = None
    # Log mode: the drainer's batch of inserted facts, inside the batch's transaction (``metering.drain``).
    on_stored_many: Callable[[Sequence[StoredFact]], None] | None = None

    def record_fact(self, event: UsageEvent, *, context: TenantContext | None = None) -> int:
        """Store the fact (no decision); returns its id.

        Log mode (``METERING["WRITE_MODE"] = "log"``): the fact is counted and appended to its tree's Redis stream
        (``metering.appender``) and persisted by the drainer, ``on_stored`` included; returns 0 (no id yet)."""
        if log.is_log_mode():
            appender.append(validate_event(event), context=context)
            return 0
        return recorder.record(event, context=context, on_stored=self.on_stored)

    def fact_write(self, event: UsageEvent, *, context: TenantContext | None = None) -> recorder.FactWrite:
        """The fact's write unit with this adapter's ``on_stored``, for a caller that decides inside the fact's
        transaction (``quotas.handler``): see ``metering.recorder``."""
        return recorder.FactWrite(event, context=context, on_stored=self.on_stored)

    def record_facts(
        self, events: Sequence[UsageEvent], *, contexts: Sequence[TenantContext | None] | None = None, **options: Any
    ) -> bulk.BulkResult:
        """Store a batch of facts all or nothing (``metering.bulk.record_many``) with this adapter's outbox hooks
        (``on_stored_many``, else ``on_stored`` per fact) inside the batch's transaction."""
        return bulk.record_many(
            events, contexts=contexts, on_stored=self.on_stored, on_stored_many=self.on_stored_many, **options
        )

    def record_usage_many_sync(self, events: Sequence[UsageEvent]) -> bulk.BulkResult:
        """See ``BulkMeteringProtocol.record_usage_many``."""
        return self.record_facts(events)

    async def record_usage_many(self, events: Sequence[UsageEvent]) -> bulk.BulkResult:
        return await sync_to_async(self.record_facts)(events)

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
