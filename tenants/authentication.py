"""DRF authentication by API key: ``Authorization: Bearer xk_<prefix>_<secret>``.

``request.user`` becomes a ``TenantPrincipal`` (the key's tenant, acting for its subtree) and ``request.auth`` the
``ApiKey``. No header: not authenticated (401 from views that require it). A bad, revoked or expired key: 401. A
key whose tenant (or an ancestor) is deactivated: 403.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from .apikeys import key_for_request
from .context import TenantContext
from .exceptions import InvalidApiKey
from .lineage import get_context
from .models import ApiKey, Tenant


@dataclass(eq=False)
class TenantPrincipal:
    """Who calls: an API key's tenant. It may read its whole subtree and manage strictly below itself."""

    api_key: ApiKey
    tenant: Tenant
    _context: TenantContext | None = field(default=None, repr=False)

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    def __str__(self) -> str:
        return f"api key {self.api_key.prefix} of {self.tenant.external_id}"

    @property
    def pk(self) -> str:
        return f"apikey:{self.api_key.prefix}"

    @property
    def context(self) -> TenantContext:
        if self._context is None:
            self._context = get_context(self.tenant.external_id, require_active=False)
        return self._context

    def sees(self, tenant: Tenant) -> bool:
        """``tenant`` is the principal's own tenant or below it."""
        return self.tenant.contains(tenant.path)

    def manages(self, tenant: Tenant) -> bool:
        """``tenant`` is strictly below the principal's tenant: never its own tenant, never an ancestor."""
        return self.tenant.is_strictly_above(tenant.path)

    def sees_context(self, context: TenantContext) -> bool:
        return any(level.pk == self.tenant.pk for level in context.lineage)

    def has_perm(self, perm: str, obj: Any = None) -> bool:  # never a Django user with permissions
        return False


class InactiveTenantError(exceptions.PermissionDenied):
    default_code = "inactive_tenant"
    field = "Authorization"


class ApiKeyAuthentication(BaseAuthentication):
    www_authenticate_realm = "api"

    def authenticate(self, request: Request) -> tuple[TenantPrincipal, ApiKey] | None:
        try:
            key = key_for_request(request._request)
        except InvalidApiKey as error:
            raise exceptions.AuthenticationFailed(str(error), code=error.code) from None
        if key is None:
            return None
        principal = TenantPrincipal(api_key=key, tenant=key.tenant)
        if not principal.context.is_active:
            raise InactiveTenantError(f"the tenant of this API key ({key.tenant.external_id!r}) is deactivated")
        return principal, key

    def authenticate_header(self, request: Request) -> str:
        return f'Bearer realm="{self.www_authenticate_realm}"'
