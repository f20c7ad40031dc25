"""Small builders shared by the tests."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.test import override_settings

from metering import UsageEvent, get_meter
from tenants.models import Tenant
from tenants.tree import create_tenant

# Two organizations, the shape the API and admin tests share (see their fixture modules for who holds which key).
FOREST = {
    "acme": None,
    "acme-chat": "acme",
    "acme-chat-key-1": "acme-chat",
    "acme-chat-key-2": "acme-chat",
    "acme-search": "acme",
    "acme-search-key-1": "acme-search",
    "other": None,
    "other-project": "other",
}


def tree(spec: dict[str, str | None], **flags: dict[str, bool]) -> dict[str, Tenant]:
    """Create tenants from {id: parent_id}, parents listed before children."""
    created: dict[str, Tenant] = {}
    for tenant_id, parent in spec.items():
        created[tenant_id] = create_tenant(tenant_id, parent=parent, kind="organization" if parent is None else "")
    return created


def record(tenant_id: str, quantity: Decimal | int | str, feature: str = "llm_tokens", **kwargs: object) -> None:
    get_meter().record_usage_sync(UsageEvent(tenant_id, feature, quantity, **kwargs))  # type: ignore[arg-type]


def usage(tenant_id: str, feature: str = "llm_tokens", start: datetime | None = None, end: datetime | None = None):
    return get_meter().get_usage_sync(tenant_id, feature, start, end)


def nested(depth: int) -> dict[str, Any]:
    """A dict ``depth`` levels deep ({"a": {"a": ... {}}} has depth levels of objects)."""
    root: dict[str, Any] = {}
    node = root
    for _ in range(depth - 1):
        node["a"] = {}
        node = node["a"]
    return root


class any_backdate(override_settings):
    """``METERING['MAX_BACKDATE'] = None``, merged into the ``METERING`` in force when it is entered: for tests dated
    at fixed moments (windows, rollups, delivery formats), which the backdating window is not what they test."""

    def __init__(self) -> None:
        super().__init__()

    def enable(self) -> None:
        self.options = {"METERING": {**getattr(settings, "METERING", {}), "MAX_BACKDATE": None}}
        super().enable()
