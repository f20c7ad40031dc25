"""Quota signals, sent after commit (a rejection has nothing to commit: it is sent once the attempt rolled back)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import Signal, receiver

from metering.signals import facts_drained

from .models import QuotaLimit

if TYPE_CHECKING:
    from metering.drain import StoredFact

# Arguments: context (TenantContext), status (QuotaStatus), threshold (int percent). Once per threshold per window.
quota_threshold_reached = Signal()
# Arguments: context (TenantContext), error (QuotaExceeded).
quota_exceeded = Signal()


@receiver([post_save, post_delete], sender=QuotaLimit, dispatch_uid="xaas_quotas_invalidate_rules")
def _invalidate_rules(sender: type[QuotaLimit], instance: QuotaLimit, **kwargs: Any) -> None:
    from .rules import invalidate

    tenant_pk, feature = instance.tenant_id, instance.feature
    # robust: the change is committed; a cache that cannot be told is logged (and bounded by CACHE_TIMEOUT).
    transaction.on_commit(lambda: invalidate(tenant_pk, feature), using=kwargs.get("using"), robust=True)


@receiver(facts_drained, dispatch_uid="xaas_quotas_link_reservations")
def _link_reservations(sender: Any, facts: Sequence[StoredFact], using: str, **kwargs: Any) -> None:
    """Log mode: a reservation committed by a logged fact gets the fact's id once the drainer inserts it (in the
    batch's transaction), as commit mode sets it in the fact's own."""
    from .models import QuotaReservation

    for fact in facts:
        if fact.entry.reservation is not None:
            QuotaReservation.objects.using(using).filter(pk=fact.entry.reservation, record_id__isnull=True).update(
                record_id=fact.record_id
            )
