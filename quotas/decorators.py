"""``@enforce_quota(feature, quantity=1)``: one line to meter and enforce a view, sync or async.

Works on function views, on class-based and DRF views through ``method_decorator``. The tenant comes from
``request.tenant`` (``tenants.middleware.TenantMiddleware``), and so does what the caller may learn (``quotas.http``:
levels above its credential are never named or measured). Blocked requests get a 429 JSON answer; when the
database (or Redis, with no fallback left) is down, a 503 JSON answer with ``Retry-After``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse

from metering.exceptions import InvalidUsageEvent
from tenants.context import TenantContext
from tenants.middleware import not_authenticated_response
from tenants.unavailable import STORE_ERRORS

from .exceptions import QuotaExceeded
from .handler import QuotaPolicyHandler
from .http import add_quota_headers, error_response, quota_exceeded_response, service_unavailable_response
from .ledger import Decision

Quantity = Decimal | int | str
QuantitySpec = Quantity | Callable[[HttpRequest], Quantity]
View = TypeVar("View", bound=Callable[..., Any])


def _request_of(args: tuple[Any, ...]) -> HttpRequest:
    # Function views get the request first; methods (through method_decorator) too; DRF passes its Request.
    for arg in args:
        if isinstance(arg, HttpRequest) or hasattr(arg, "_request"):
            return arg
    raise TypeError("enforce_quota: the view was called without a request")


def decide_for_request(request: HttpRequest, feature: str, quantity: QuantitySpec) -> Decision | HttpResponse:
    """Consume quota for the request's tenant; an ``HttpResponse`` when the request must not go on."""
    tenant: TenantContext | None = getattr(request, "tenant", None)
    if tenant is None:  # no usable credential: nothing is recorded, nothing spent, no tenant named (401)
        return not_authenticated_response()
    try:
        amount = quantity(request) if callable(quantity) else quantity
        return QuotaPolicyHandler(tenant).consume(feature, amount)
    except QuotaExceeded as error:
        return quota_exceeded_response(error, seen_by=tenant)
    except InvalidUsageEvent as error:
        return error_response(400, error.code, error.field, str(error))
    except STORE_ERRORS as error:
        return service_unavailable_response(error, f"quota decision on {feature!r}")


def enforce_quota(feature: str, quantity: QuantitySpec = 1) -> Callable[[View], View]:
    def decorator(view: View) -> View:
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                request = _request_of(args)
                outcome = await sync_to_async(decide_for_request)(request, feature, quantity)
                if isinstance(outcome, HttpResponse):
                    return outcome
                return add_quota_headers(await view(*args, **kwargs), outcome, seen_by=getattr(request, "tenant", None))

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            request = _request_of(args)
            outcome = decide_for_request(request, feature, quantity)
            if isinstance(outcome, HttpResponse):
                return outcome
            return add_quota_headers(view(*args, **kwargs), outcome, seen_by=getattr(request, "tenant", None))

        return wrapper  # type: ignore[return-value]

    return decorator
