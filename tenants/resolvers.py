"""Resolvers turn a request into a tenant id. ``METERING["TENANT_RESOLVER"]`` names the one in use."""

from __future__ import annotations

from django.http import HttpRequest

from .conf import tenant_settings
from .context import TenantContext


def header_resolver(request: HttpRequest) -> str | None:
    """The tenant id from the ``X-Tenant-ID`` header (``METERING["TENANT_HEADER"]``), or ``None``."""
    value = request.headers.get(tenant_settings.TENANT_HEADER)
    return value.strip() if value else None


def api_key_resolver(request: HttpRequest) -> TenantContext | str | None:
    """The tenant of the request's ``Authorization: Bearer`` API key (``tenants.apikeys``).

    A key acts for its tenant's subtree: with a key, the ``X-Tenant-ID`` header may narrow the request to a tenant
    below the key's own (any other tenant answers 404, as an unknown one would). Without a key, the header alone is
    trusted only when ``METERING["API_KEY_HEADER_FALLBACK"]`` is true (e.g. behind a gateway that sets it);
    otherwise the request has no tenant. A bad, revoked or expired key raises ``InvalidApiKey`` (401).
    """
    from .apikeys import key_for_request
    from .exceptions import InactiveTenant, UnknownTenant
    from .lineage import get_context

    key = key_for_request(request)
    if key is None:
        return header_resolver(request) if tenant_settings.API_KEY_HEADER_FALLBACK else None
    named = header_resolver(request)
    if named is None or named == key.tenant.external_id:
        try:
            return get_context(key.tenant.external_id)
        except InactiveTenant as error:
            raise InactiveTenant(str(error), field="Authorization") from None
    context = get_context(named, require_active=False)
    if key.tenant_id not in [level.pk for level in context.lineage]:
        raise UnknownTenant(f"unknown tenant {named!r}")
    return get_context(named)
