"""The base of adapters that deliver facts elsewhere: record exactly like the database adapter, and queue each fact
in the outbox inside its own transaction (a rolled-back fact is never sent, a committed one always is)."""

from __future__ import annotations

from typing import ClassVar

from tenants.context import TenantContext

from .. import outbox
from ..events import ValidEvent
from .database import DatabaseMeteringAdapter


class OutboxMeteringAdapter(DatabaseMeteringAdapter):
    """Quotas and usage reads stay local (the database and Redis counters); the sink only receives facts.

    Every path that stores a fact (``record_fact``, ``fact_write``: quota-enforced ones) runs ``on_stored`` inside the
    fact's transaction. The request thread only writes the outbox row; Celery workers deliver (``metering.tasks``).
    """

    sink: ClassVar[str] = ""

    def on_stored(self, valid: ValidEvent, record_id: int, context: TenantContext) -> None:
        outbox.enqueue(self.sink, record_id)
