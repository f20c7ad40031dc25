"""Resolvers turn a request into a tenant id. ``METERING["TENANT_RESOLVER"]`` names the one in use."""

from __future__ import annotations

from django.http import HttpRequest

from .conf import tenant_settings


def header_resolver(request: HttpRequest) -> str | None:
    """The tenant id from the ``X-Tenant-ID`` header (``METERING["TENANT_HEADER"]``), or ``None``."""
    value = request.headers.get(tenant_settings.TENANT_HEADER)
    return value.strip() if value else None
