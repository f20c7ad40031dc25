"""``MeteringProtocol``: what every metering adapter offers (the product brief's interface)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Protocol, runtime_checkable

from .events import UsageEvent


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
