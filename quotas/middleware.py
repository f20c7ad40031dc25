"""``QuotaMiddleware``: meter and enforce routes from settings, without touching views.

``METERING["QUOTA_ROUTES"]`` is a list of ``{"url_name": ...}`` or ``{"path_prefix": ...}`` entries with a
``feature`` and a ``quantity`` (default 1). Put it after ``TenantMiddleware``. A view that raises
``QuotaExceeded`` itself (through ``QuotaPolicyHandler``) is answered 429 too; a data store down, in the decision
or in the view, 503 JSON with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.utils.deprecation import MiddlewareMixin

from metering.conf import metering_settings
from tenants.unavailable import is_store_unavailable

from .decorators import decide_for_request
from .exceptions import QuotaExceeded
from .http import add_quota_headers, quota_exceeded_response, service_unavailable_response
from .ledger import Decision

DECISION_ATTRIBUTE = "_xaas_quota_decision"


def route_for(request: HttpRequest) -> dict[str, Any] | None:
    match = getattr(request, "resolver_match", None)
    for route in metering_settings.QUOTA_ROUTES:
        if "url_name" in route and match is not None and match.view_name == route["url_name"]:
            return dict(route)
        if "path_prefix" in route and request.path.startswith(route["path_prefix"]):
            return dict(route)
    return None


class QuotaMiddleware(MiddlewareMixin):
    """Sync and async capable (``MiddlewareMixin``); the decision runs in ``process_view``."""

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponse | None:
        route = route_for(request)
        if route is None:
            return None
        outcome = decide_for_request(request, route["feature"], route.get("quantity", 1))
        if isinstance(outcome, HttpResponse):
            return outcome
        setattr(request, DECISION_ATTRIBUTE, outcome)
        return None

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        decision: Decision | None = getattr(request, DECISION_ATTRIBUTE, None)
        if decision is None:
            return response
        return add_quota_headers(response, decision, seen_by=getattr(request, "tenant", None))

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, QuotaExceeded):
            return quota_exceeded_response(exception, seen_by=getattr(request, "tenant", None))
        if is_store_unavailable(exception):
            return service_unavailable_response(exception, f"view {request.path!r}")
        return None
