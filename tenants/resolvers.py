"""Resolvers turn a request into the tenant it acts for. ``METERING["TENANT_RESOLVER"]`` names the one in use.

The rule: a request acts for a tenant only on a credential. ``api_key_resolver`` (the default) takes the tenant of
the ``Authorization: Bearer`` API key; ``X-Tenant-ID`` may only narrow it to a tenant of the key's subtree. A
request without a key has no tenant (``None``): the enforcement points answer it 401, whatever headers it sends.
``header_resolver`` trusts ``X-Tenant-ID`` itself, which is right only in development or behind a gateway that sets
the header and never forwards a client's: with ``DEBUG`` off it acts on nothing unless
``METERING["TRUST_TENANT_HEADER"]`` says so (and the ``xaas_tenants.E004`` check fails until it does).

Every context a resolver returns is ``seen_from`` its credential's tenant (``TenantContext.visible_from``), so HTTP
answers never describe the levels above it. Messages follow the same rule: a deactivated level above the caller's
own is never named, and a tenant outside the key's subtree answers exactly as one that does not exist.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.http import HttpRequest

from .conf import tenant_settings
from .context import TenantContext
from .exceptions import InactiveTenant, UnknownTenant
from .models import ApiKey, Tenant

logger = logging.getLogger("tenants.resolvers")

# One message for an unknown id and for one outside the caller's reach, without the id: nothing to tell them apart.
UNKNOWN_TENANT_MESSAGE = "unknown tenant: no tenant with this id is within reach of this credential"
_untrusted_header_reported = False


def named_tenant_id(request: HttpRequest) -> str | None:
    """The raw ``X-Tenant-ID`` header (``METERING["TENANT_HEADER"]``), stripped; ``None`` when absent or empty."""
    value = (request.headers.get(tenant_settings.TENANT_HEADER) or "").strip()
    return value or None


def header_is_trusted() -> bool:
    """May ``header_resolver`` act on the header? In development (``DEBUG``) or when acknowledged by the setting."""
    return bool(settings.DEBUG or tenant_settings.TRUST_TENANT_HEADER)


def header_resolver(request: HttpRequest) -> TenantContext | None:
    """The tenant named by ``X-Tenant-ID``, trusted as is: development and trusted internal networks only.

    With ``DEBUG`` off and ``METERING["TRUST_TENANT_HEADER"]`` not set, the header is never acted on (``None``: the
    enforcement points answer 401), so a deployment that skipped the system checks does not trust its clients.
    """
    global _untrusted_header_reported
    named = named_tenant_id(request)
    if named is None:
        return None
    if not header_is_trusted():
        if not _untrusted_header_reported:
            _untrusted_header_reported = True
            logger.error(
                "tenants.resolvers.header_resolver ignores %s: DEBUG is off and METERING['TRUST_TENANT_HEADER'] "
                "is not set (see the xaas_tenants.E004 check)",
                tenant_settings.TENANT_HEADER,
            )
        return None
    return context_for_tenant_id(named)


def context_for_tenant_id(tenant_id: str) -> TenantContext:
    """The active context of ``tenant_id`` for a caller whose credential is that tenant itself.

    Raises ``UnknownTenant`` (without echoing the id) or ``InactiveTenant`` (naming no level above it)."""
    from .lineage import get_context

    try:
        context = get_context(tenant_id, require_active=False)
    except UnknownTenant:
        raise UnknownTenant(UNKNOWN_TENANT_MESSAGE) from None
    return require_active(context.seen_from(context.tenant.pk))


def require_active(context: TenantContext, *, field: str | None = None) -> TenantContext:
    """``context`` when every level is active; else ``InactiveTenant``, naming the deactivated level only when the
    caller may see it (``visible_from``)."""
    inactive = next((index for index, level in enumerate(context.lineage) if not level.is_active), None)
    if inactive is None:
        return context
    if inactive < context.visible_from:
        where = "a tenant above it is deactivated"
    elif inactive == len(context.lineage) - 1:
        where = "it is deactivated"
    else:
        where = f"deactivated at {context.lineage[inactive].tenant_id!r}"
    raise InactiveTenant(f"tenant {context.tenant_id!r} is inactive ({where})", field=field)


def api_key_resolver(request: HttpRequest) -> TenantContext | None:
    """The tenant of the request's ``Authorization: Bearer`` API key (``tenants.apikeys``), or ``None`` without one.

    A key acts for its tenant's subtree: ``X-Tenant-ID`` may narrow the request to a tenant below the key's own; any
    other id answers 404 exactly as an unknown one. Without a key the header is ignored, and so is an
    ``Authorization`` header of another scheme (``Basic``, ``Token``: a host project's own views use them; to the
    quota they are no credential). A malformed, unknown, revoked or expired key raises ``InvalidApiKey`` (401).
    """
    from .apikeys import key_for_request

    key = key_for_request(request)
    if key is None:
        return None
    return key_context(key, named_tenant_id(request))


def key_context(key: ApiKey, named: str | None) -> TenantContext:
    """The context ``key`` acts for: its own tenant, or ``named`` when that is in the key's subtree."""
    from .lineage import get_context, validate_tenant_id

    found = get_context(key.tenant.external_id, require_active=False)
    if not found.is_visible(key.tenant.pk):
        # The cached lineage is not the key's tenant's any more (its id was deleted and reused): read it again.
        found = get_context(key.tenant.external_id, require_active=False, use_cache=False)
        if not found.is_visible(key.tenant.pk):
            raise UnknownTenant(UNKNOWN_TENANT_MESSAGE)
    own = found.seen_from(key.tenant.pk)
    require_active(own, field="Authorization")
    if named is None or named == own.tenant_id:
        return own
    validate_tenant_id(named)
    # The subtree decides in one query that costs the same for an id outside it as for no id at all: the lineage
    # cache is consulted only after, for tenants the key may use, so a cached foreign lineage cannot answer faster.
    subtree = Tenant.objects.filter(external_id=named, path__startswith=key.tenant.path)
    if not key.tenant.path or not subtree.exists():
        raise UnknownTenant(UNKNOWN_TENANT_MESSAGE)
    context = get_context(named, require_active=False)
    if not context.is_visible(key.tenant.pk):
        # The cached lineage disagrees with the query above: cached before a move into the subtree (its
        # invalidation not seen yet), or the tenant moved out since. The database decides.
        context = get_context(named, require_active=False, use_cache=False)
        if not context.is_visible(key.tenant.pk):
            raise UnknownTenant(UNKNOWN_TENANT_MESSAGE)
    return require_active(context.seen_from(key.tenant.pk))
