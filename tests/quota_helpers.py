"""Builders for quota tests."""

from __future__ import annotations

from decimal import Decimal

from quotas.models import QuotaLimit
from tenants.lineage import invalidate
from tenants.models import Tenant


def limit(tenant_id: str, amount: int | str, feature: str = "llm_tokens", period: str = "month", **kwargs: object):
    quota = QuotaLimit.objects.create(
        tenant=Tenant.objects.get(external_id=tenant_id),
        feature=feature,
        limit=Decimal(amount),
        period=period,
        **kwargs,
    )
    from quotas.rules import invalidate as forget_rules

    forget_rules(quota.tenant_id, feature)  # on-commit invalidation does not run inside a test transaction
    return quota


def set_exempt(tenant_id: str) -> None:
    """As the admin does it: ``save()`` (log mode bumps the tree's epoch in its signal), then what its commit does
    (the epoch pushed, lineages invalidated), which a test transaction never reaches."""
    from django.test import TestCase

    with TestCase.captureOnCommitCallbacks(execute=True):
        tenant = Tenant.objects.get(external_id=tenant_id)
        tenant.exempt = True
        tenant.save()
    invalidate(Tenant.objects.values_list("external_id", flat=True))
