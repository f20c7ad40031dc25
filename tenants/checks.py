"""System checks of the tenant settings."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.utils.module_loading import import_string

from .conf import tenant_settings


@register()
def check_tenant_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    resolver = None
    try:
        resolver = import_string(tenant_settings.TENANT_RESOLVER)
    except ImportError as error:
        messages.append(
            Error(
                f"METERING['TENANT_RESOLVER'] cannot be imported: {error}",
                hint="Give the dotted path of a callable taking the request and returning a tenant id or None.",
                id="xaas_tenants.E001",
            )
        )
    messages += _identity_messages(resolver)
    if tenant_settings.CACHE_ALIAS not in settings.CACHES:
        messages.append(
            Error(
                f"METERING['CACHE_ALIAS'] is {tenant_settings.CACHE_ALIAS!r}, which is not in CACHES.",
                id="xaas_tenants.E002",
            )
        )
    for alias, database in settings.DATABASES.items():
        mode = database.get("OPTIONS", {}).get("transaction_mode")
        if database.get("ENGINE", "").endswith("sqlite3") and mode != "IMMEDIATE":
            messages.append(
                Warning(
                    f"Database {alias!r} is SQLite without transaction_mode='IMMEDIATE'.",
                    hint="Concurrent usage writers may fail with 'database is locked' and counters cannot be "
                    "rebuilt exactly. Set DATABASES[...]['OPTIONS']['transaction_mode'] = 'IMMEDIATE'.",
                    id="xaas_tenants.W001",
                )
            )
    return messages


def _identity_messages(resolver: object) -> list[CheckMessage]:
    """Who a request may act for: never whoever a client names in a header, unless that was chosen knowingly."""
    from .resolvers import header_resolver

    metering = getattr(settings, "METERING", {})
    messages: list[CheckMessage] = []
    if metering.get("API_KEY_HEADER_FALLBACK"):
        messages.append(
            Error(
                "METERING['API_KEY_HEADER_FALLBACK'] is no longer supported: it let any request without an API key "
                "act as the tenant named in X-Tenant-ID (and spend its quota).",
                hint="Remove it. Clients send 'Authorization: Bearer <API key>' (X-Tenant-ID may then narrow to a "
                "tenant of the key's subtree). If a trusted gateway sets X-Tenant-ID itself, use "
                "TENANT_RESOLVER = 'tenants.resolvers.header_resolver' with TRUST_TENANT_HEADER = True.",
                id="xaas_tenants.E003",
            )
        )
    elif "API_KEY_HEADER_FALLBACK" in metering:
        messages.append(
            Warning(
                "METERING['API_KEY_HEADER_FALLBACK'] has no effect any more.",
                hint="Remove it: without an API key a request has no tenant.",
                id="xaas_tenants.W002",
            )
        )
    if resolver is header_resolver and not settings.DEBUG and not tenant_settings.TRUST_TENANT_HEADER:
        messages.append(
            Error(
                "METERING['TENANT_RESOLVER'] is tenants.resolvers.header_resolver with DEBUG off: any client could "
                "act as any tenant by naming it in the X-Tenant-ID header, so the header is ignored.",
                hint="Use 'tenants.resolvers.api_key_resolver' (the default: clients send 'Authorization: Bearer "
                "<API key>'). Only if a gateway you control sets X-Tenant-ID and never forwards a client's, "
                "acknowledge it with METERING['TRUST_TENANT_HEADER'] = True.",
                id="xaas_tenants.E004",
            )
        )
    return messages
