"""Quota signals, sent after commit (a rejection has nothing to commit: it is sent once the attempt rolled back)."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import Signal, receiver

from .models import QuotaLimit

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
