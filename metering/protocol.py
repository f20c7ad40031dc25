"""``MeteringProtocol``: what every metering adapter offers (the product brief's interface)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .events import UsageEvent

if TYPE_CHECKING:
    from .bulk import BulkResult


@runtime_checkable
class MeteringProtocol(Protocol):
    async def record_usage(self, event: UsageEvent) -> None:
        """Store ``event`` once and count it at every level of its tenant's lineage.

        Raises an ``InvalidUsageEvent`` (a ``ValueError``) for bad input, ``UnknownTenant``/``InactiveTenant``,
        or ``DuplicateUsageEvent`` when the tenant already recorded this ``transaction_id``.
        """
        ...

    async def get_usage(
        self, tenant_id: str, feature_name: str, start_time: datetime | None, end_time: datetime | None
    ) -> Decimal:
        """Usage of ``feature_name`` by the tenant's whole subtree in ``[start_time, end_time)``."""
        ...

    def record_usage_sync(self, event: UsageEvent) -> None: ...

    def get_usage_sync(
        self, tenant_id: str, feature_name: str, start_time: datetime | None, end_time: datetime | None
    ) -> Decimal: ...


@runtime_checkable
class BulkMeteringProtocol(MeteringProtocol, Protocol):
    """A meter that also stores batches (``DatabaseMeteringAdapter`` and its subclasses): ``metering.bulk``."""

    async def record_usage_many(self, events: Sequence[UsageEvent]) -> BulkResult:
        """Store a batch all or nothing: every event validated first (``InvalidBatch`` with the errors per index,
        nothing stored), then one transaction. A ``transaction_id`` the tenant already has (or a lower index of the
        batch has) is a duplicate, reported by index in the result, never an error."""
        ...

    def record_usage_many_sync(self, events: Sequence[UsageEvent]) -> BulkResult: ...
