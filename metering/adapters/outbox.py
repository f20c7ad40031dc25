"""The base of adapters that deliver facts elsewhere: record exactly like the database adapter, and queue each fact
in the outbox inside its own transaction (a rolled-back fact is never sent, a committed one always is)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from tenants.context import TenantContext

from ..conf import metering_settings
from ..delivery import outbox
from ..delivery.sinks.base import configured_sink_classes, sink_class_at
from ..events import ValidEvent
from .database import DatabaseMeteringAdapter

if TYPE_CHECKING:
    from ..bulk import StoredFact


class OutboxMeteringAdapter(DatabaseMeteringAdapter):
    """Quotas and usage reads stay local (the database and Redis counters); the sink only receives facts.

    ``sink_class`` names the sink by dotted path (``"metering.delivery.sinks.lago.LagoSink"``; a project's own
    ``Sink`` subclass works the same, nothing to register); its rows in the outbox carry the class's short ``name``.
    Every path that stores a fact (``record_fact``, ``fact_write``: quota-enforced ones) runs ``on_stored`` inside the
    fact's transaction. The request thread only writes the outbox row; Celery workers deliver (``metering.tasks``).
    """

    sink_class: ClassVar[str] = ""

    @property
    def sink_name(self) -> str:
        """The name the outbox rows store (``SinkNotConfigured`` for a ``sink_class`` that names no sink)."""
        return sink_class_at(self.sink_class).name

    @property
    def sink_names(self) -> list[str]:
        """Every sink a fact is queued for: ``METERING["SINKS"]``, else this adapter's own sink."""
        if metering_settings.SINKS is None:
            return [self.sink_name]
        return [sink_class.name for sink_class in configured_sink_classes()]

    def on_stored(self, valid: ValidEvent, record_id: int, context: TenantContext) -> None:
        for name in self.sink_names:  # one row per sink: independent state, retries and dead letters
            outbox.enqueue(name, record_id)

    def on_stored_many(self, facts: Sequence[StoredFact]) -> None:
        """Log mode: the outbox rows of a drained batch, in one bulk insert inside the batch's transaction."""
        for name in self.sink_names:
            outbox.enqueue_many(name, [fact.record_id for fact in facts])
