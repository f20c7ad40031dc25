"""Tenant settings, read from ``settings.METERING`` at use time so ``override_settings`` works."""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings

DEFAULTS: dict[str, Any] = {
    "TENANT_HEADER": "X-Tenant-ID",
    # A credential by default: the API key (Authorization: Bearer). See tenants.resolvers.
    "TENANT_RESOLVER": "tenants.resolvers.api_key_resolver",
    "CACHE_ALIAS": "default",
    "LINEAGE_CACHE_TIMEOUT": 300,
    "MAX_TREE_DEPTH": 16,
    # The namespace of every Redis/cache key of this site (None: from KEY_PREFIX and the database, tenants.namespace).
    "REDIS_NAMESPACE": None,
    # tenants.resolvers.header_resolver trusts whoever sets the header: with DEBUG off it acts on nothing (and the
    # xaas_tenants.E004 check fails) unless this acknowledges that a gateway you control sets it, never a client.
    "TRUST_TENANT_HEADER": False,
}


class TenantSettings:
    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(name)
        return getattr(django_settings, "METERING", {}).get(name, DEFAULTS[name])


tenant_settings = TenantSettings()
