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
    try:
        import_string(tenant_settings.TENANT_RESOLVER)
    except ImportError as error:
        messages.append(
            Error(
                f"METERING['TENANT_RESOLVER'] cannot be imported: {error}",
                hint="Give the dotted path of a callable taking the request and returning a tenant id or None.",
                id="xaas_tenants.E001",
            )
        )
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
