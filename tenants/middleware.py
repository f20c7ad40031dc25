"""Resolve ``request.tenant`` (a ``TenantContext`` or ``None``) once per request, for sync and async views.

A database (or cache) that is down while the tenant is resolved, or while any later view runs, is answered with a
JSON 503 and ``Retry-After`` (``tenants.unavailable``), never an HTML 500.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.module_loading import import_string

from .conf import tenant_settings
from .context import TenantContext
from .exceptions import InactiveTenant, InvalidApiKey, TenantError, UnknownTenant
from .resolvers import context_for_tenant_id
from .unavailable import STORE_ERRORS, is_store_unavailable, unavailable_response


def resolve_tenant(request: HttpRequest) -> TenantContext | None:
    """The request's tenant context; ``None`` when the request has no credential for one. Raises ``TenantError``.

    A resolver may return a tenant id: its context is then seen from that tenant itself (nothing above it shown)."""
    resolver: Callable[[HttpRequest], str | TenantContext | None] = import_string(tenant_settings.TENANT_RESOLVER)
    resolved = resolver(request)
    if resolved is None or isinstance(resolved, TenantContext):
        return resolved
    return context_for_tenant_id(resolved)


NOT_AUTHENTICATED_MESSAGE = "authentication required: send 'Authorization: Bearer <API key>'"


def not_authenticated_response() -> JsonResponse:
    """The one answer of every enforcement point to a request without a usable credential: it names no tenant,
    whatever the request claimed, so it tells nothing about any."""
    response = JsonResponse(
        {"error": {"code": "not_authenticated", "field": "Authorization", "message": NOT_AUTHENTICATED_MESSAGE}},
        status=401,
    )
    response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response


def tenant_error_response(error: TenantError) -> JsonResponse:
    status = 404 if isinstance(error, UnknownTenant) else 403 if isinstance(error, InactiveTenant) else 400
    if isinstance(error, InvalidApiKey):
        status = 401
    field = tenant_settings.TENANT_HEADER if error.field == "tenant_id" else error.field
    response = JsonResponse({"error": {"code": error.code, "field": field, "message": str(error)}}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response


class TenantMiddleware:
    """Sets ``request.tenant`` (``None`` without a credential: views that need a tenant answer 401). A bad API key is
    answered 401, a tenant outside the credential's reach 404 and an inactive one 403, in JSON; a data store that is
    down, while resolving it or in a view, 503 in JSON."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self.is_async:
            return self.__acall__(request)
        try:
            request.tenant = resolve_tenant(request)  # type: ignore[attr-defined]
        except TenantError as error:
            return tenant_error_response(error)
        except STORE_ERRORS as error:
            return unavailable_response(error, "tenant resolution")
        response: HttpResponse = self.get_response(request)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        try:
            request.tenant = await sync_to_async(resolve_tenant)(request)  # type: ignore[attr-defined]
        except TenantError as error:
            return tenant_error_response(error)
        except STORE_ERRORS as error:
            return unavailable_response(error, "tenant resolution")
        response: HttpResponse = await self.get_response(request)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """A view (or a later middleware) that met a store down: 503 JSON; anything else is Django's to answer."""
        if is_store_unavailable(exception):
            return unavailable_response(exception, f"view {request.path!r}")
        return None
