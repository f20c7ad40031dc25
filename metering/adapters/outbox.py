"""The base of adapters that deliver facts elsewhere: record exactly like the database adapter, and queue each fact
in the outbox inside its own transaction (a rolled-back fact is never sent, a committed one always is)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from tenants.context import TenantContext

from .. import outbox
from ..events import ValidEvent
from .database import DatabaseMeteringAdapter

if TYPE_CHECKING:
    from ..drain import StoredFact


class OutboxMeteringAdapter(DatabaseMeteringAdapter):
    """Quotas and usage reads stay local (the database and Redis counters); the sink only receives facts.

    Every path that stores a fact (``record_fact``, quota-enforced ones included) runs ``on_stored`` inside the
    fact's transaction. The request thread only writes the outbox row; Celery workers deliver (``metering.tasks``).
    """

    sink: ClassVar[str] = ""

    def on_stored(self, valid: ValidEvent, record_id: int, context: TenantContext) -> None:
        outbox.enqueue(self.sink, record_id)

    def on_stored_many(self, facts: Sequence[StoredFact]) -> None:
        """Log mode: the outbox rows of a drained batch, in one bulk insert inside the batch's transaction."""
        outbox.enqueue_many(self.sink, [fact.record_id for fact in facts])
