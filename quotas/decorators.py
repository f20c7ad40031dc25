"""``@enforce_quota(feature, quantity=1)``: one line to meter and enforce a view, sync or async.

**When the charge happens.** By default the quota is consumed — the fact recorded — *before* the view runs: a view
that then raises or answers 5xx has still been charged (exact and cheapest: one decision, and concurrent requests
can never overrun a level). With ``refund_on_error=True`` the quantity is *reserved* at every level before the view
(the same refusals, the same atomicity) and recorded only when the view returns a response below 500; an exception
or a 5xx gives the whole reservation back and records nothing. A reservation whose process dies mid-view is given
back when it expires (``quotas.expire_reservations``).

Works on function views, on class-based and DRF views through ``method_decorator``. The tenant comes from
``request.tenant`` (``tenants.middleware.TenantMiddleware``), and so does what the caller may learn (``quotas.http``:
levels above its credential are never named or measured). Blocked requests get a 429 JSON answer; when the
database (or Redis, with no fallback left) is down, a 503 JSON answer with ``Retry-After``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse

from metering.exceptions import InvalidUsageEvent
from tenants.context import TenantContext
from tenants.exceptions import TenantError
from tenants.middleware import not_authenticated_response, tenant_error_response
from tenants.unavailable import STORE_ERRORS

from .exceptions import QuotaExceeded
from .handler import QuotaPolicyHandler, Reservation
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


def reserve_for_request(request: HttpRequest, feature: str, quantity: QuantitySpec) -> Reservation | HttpResponse:
    """``decide_for_request`` for ``refund_on_error``: hold the quantity at every level instead of recording it."""
    tenant: TenantContext | None = getattr(request, "tenant", None)
    if tenant is None:
        return not_authenticated_response()
    try:
        amount = quantity(request) if callable(quantity) else quantity
        return QuotaPolicyHandler(tenant).reserve(feature, amount)
    except QuotaExceeded as error:
        return quota_exceeded_response(error, seen_by=tenant)
    except InvalidUsageEvent as error:
        return error_response(400, error.code, error.field, str(error))
    except STORE_ERRORS as error:
        return service_unavailable_response(error, f"quota reservation on {feature!r}")


def settle_for_request(request: HttpRequest, reservation: Reservation, response: Any) -> Any:
    """After the view: record the reserved quantity for a response below 500, give it back for a 5xx."""
    tenant = getattr(request, "tenant", None)
    if getattr(response, "status_code", 500) >= 500:
        _give_back(reservation)
        return response
    try:
        decision = reservation.commit(reservation.estimate)
    except STORE_ERRORS as error:
        # The work is done but cannot be charged now: say so (503) rather than serve it unrecorded. The
        # reservation is given back when it expires.
        return service_unavailable_response(error, f"quota commit on {reservation.row.feature!r}")
    except InvalidUsageEvent as error:
        # Refused at commit, after the view ran (the tree's feature bound filled meanwhile): nothing recorded, the
        # reservation given back now, and the caller told why — never a 500 in place of the view's answer.
        _give_back(reservation)
        return error_response(400, error.code, error.field, str(error))
    except TenantError as error:  # deactivated or removed while the view ran: nothing recorded
        _give_back(reservation)
        return tenant_error_response(error)
    return add_quota_headers(response, decision, seen_by=tenant)


def _give_back(reservation: Reservation) -> None:
    # A store that is down: the reservation expires on its own (quotas.expire_reservations), its quota comes back then.
    with contextlib.suppress(*STORE_ERRORS, TenantError):
        reservation.release()


def enforce_quota(feature: str, quantity: QuantitySpec = 1, *, refund_on_error: bool = False) -> Callable[[View], View]:
    """Meter and enforce ``view``: 429 when any level of the request's tenant has no room for ``quantity``.

    ``refund_on_error``: charge only views that succeed (see the module's docstring); by default the charge comes
    first, whatever the view does next."""

    def decorator(view: View) -> View:
        if refund_on_error:
            return _refunding(view, feature, quantity)
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


def _refunding(view: View, feature: str, quantity: QuantitySpec) -> View:
    if iscoroutinefunction(view):

        @functools.wraps(view)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            request = _request_of(args)
            held = await sync_to_async(reserve_for_request)(request, feature, quantity)
            if isinstance(held, HttpResponse):
                return held
            try:
                response = await view(*args, **kwargs)
            except BaseException:
                await sync_to_async(_give_back)(held)
                raise
            return await sync_to_async(settle_for_request)(request, held, response)

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        request = _request_of(args)
        held = reserve_for_request(request, feature, quantity)
        if isinstance(held, HttpResponse):
            return held
        try:
            response = view(*args, **kwargs)
        except BaseException:
            _give_back(held)
            raise
        return settle_for_request(request, held, response)

    return wrapper  # type: ignore[return-value]
