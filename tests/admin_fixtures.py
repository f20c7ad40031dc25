"""Builders of the admin tests: a forest, usage over the last days, and staff users bound to a subtree.

acme
├── acme-chat            <- "chat-admin" is bound here
│   ├── acme-chat-key-1
│   └── acme-chat-key-2
└── acme-search
    └── acme-search-key-1
other
└── other-project
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission

from metering.events import utcnow
from tenants.models import Tenant, TenantAdminScope
from tests.factories import FOREST, record, tree

PASSWORD = "correct-horse-battery-staple"

# What a tenant administrator is typically given (e.g. through a group); the scope narrows it to a subtree.
SCOPED_PERMISSIONS = [
    ("xaas_tenants", "tenant", ("view", "add", "change", "delete")),
    ("xaas_tenants", "apikey", ("view", "add", "change", "delete")),
    ("xaas_tenants", "tenantadminscope", ("view", "add", "change", "delete")),
    ("xaas_quotas", "quotalimit", ("view", "add", "change", "delete")),
    ("xaas_quotas", "quotareservation", ("view", "delete")),
    ("xaas_metering", "usagerecord", ("view",)),
    ("xaas_metering", "usagerollup", ("view",)),
    ("xaas_metering", "usageoutbox", ("view", "change")),
    ("xaas_metering", "sinkstate", ("view", "change")),
]


def build_forest() -> dict[str, Tenant]:
    return tree(FOREST)


def staff_user(username: str, tenant_id: str | None = None, *, permissions: bool = True):
    """A staff user with the usual model permissions, bound to ``tenant_id``'s subtree when given."""
    user = get_user_model().objects.create_user(username, password=PASSWORD, is_staff=True)
    if permissions:
        for app_label, model, actions in SCOPED_PERMISSIONS:
            user.user_permissions.add(
                *Permission.objects.filter(
                    content_type__app_label=app_label, codename__in=[f"{action}_{model}" for action in actions]
                )
            )
    if tenant_id is not None:
        TenantAdminScope.objects.create(user=user, tenant=Tenant.objects.get(external_id=tenant_id))
    return user


def superuser(username: str = "root"):
    return get_user_model().objects.create_superuser(username, password=PASSWORD)


def record_days_ago(tenant_id: str, quantity: int | str | Decimal, days: int, feature: str = "llm_tokens") -> None:
    """A fact ``days`` whole days before now (same time of day), so it lands on a known UTC date."""
    record(tenant_id, quantity, feature, timestamp=utcnow() - timedelta(days=days))
