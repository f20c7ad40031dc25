"""HTTP faces of a decision: 429 bodies and the ``Retry-After`` / IETF ``RateLimit-Policy`` / ``RateLimit`` fields;
503 when a data store is down.

**Information hiding.** Every answer is rendered for a viewer (``seen_by``: the request's ``TenantContext``), who
learns tenant ids, limits, usage and room only of the levels its credential covers (``visible_levels``). A level
above them is someone else's: it never appears in ``RateLimit-Policy``/``RateLimit`` (an allowed answer already says
it allowed), and a refusal by it is a 429 saying only that an upstream quota refused, with ``Retry-After`` and
``RateLimit: "upstream";r=0;t=<seconds>`` (no ``RateLimit-Policy``: its quota is not the caller's to know). No viewer
(``None``) sees nothing. Python callers keep everything: the hiding is here, not in ``QuotaExceeded``.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from django.http import HttpResponse, JsonResponse

from metering.events import utcnow
from metering.exceptions import ErrorAnswer
from tenants.authentication import TenantPrincipal
from tenants.context import TenantContext
from tenants.exceptions import TenantError
from tenants.lineage import get_context
from tenants.unavailable import unavailable_response

from .exceptions import QuotaExceeded
from .ledger import Decision, QuotaStatus


def _policy_name(status: QuotaStatus) -> str:
    return f"{status.tenant_id}/{status.feature}/{status.period}"


def _whole(value: Decimal) -> int:
    return max(0, math.floor(value))


def _seconds_left(status: QuotaStatus) -> int | None:
    if status.reset_at is None:
        return None
    return max(0, math.ceil((status.reset_at - utcnow()).total_seconds()))


UPSTREAM_POLICY = "upstream"


def sees(seen_by: TenantContext | None, tenant_id: str) -> bool:
    """Whether the viewer may learn the details of the level ``tenant_id``: one its credential covers."""
    return seen_by is not None and any(level.tenant_id == tenant_id for level in seen_by.visible_levels)


def visible_statuses(decision: Decision, seen_by: TenantContext | None) -> tuple[QuotaStatus, ...]:
    return tuple(status for status in decision.statuses if sees(seen_by, status.tenant_id))


def _tightest(statuses: tuple[QuotaStatus, ...]) -> QuotaStatus | None:
    candidates = [status for status in statuses if status.hard] or list(statuses)
    return min(candidates, key=lambda status: status.remaining, default=None)


def policy_header(statuses: tuple[QuotaStatus, ...]) -> str:
    items = []
    for status in statuses:
        item = f'"{_policy_name(status)}";q={_whole(status.limit)}'
        if status.reset_at is not None and status.window_start is not None:
            item += f";w={int((status.reset_at - status.window_start).total_seconds())}"
        items.append(item)
    return ", ".join(items)


def rate_limit_header(status: QuotaStatus) -> str:
    header = f'"{_policy_name(status)}";r={_whole(status.remaining)}'
    seconds = _seconds_left(status)
    return header + (f";t={seconds}" if seconds is not None else "")


def add_quota_headers(response: HttpResponse, decision: Decision, *, seen_by: TenantContext | None) -> HttpResponse:
    """Tell an allowed client how much room is left and which policies apply, of the levels it may see (the
    tightest of those: an upstream level may still refuse earlier than ``RateLimit`` says)."""
    statuses = visible_statuses(decision, seen_by)
    tightest = _tightest(statuses)
    if tightest is not None:
        response["RateLimit-Policy"] = policy_header(statuses)
        response["RateLimit"] = rate_limit_header(tightest)
    return response


def refusal_body(error: QuotaExceeded, *, seen_by: TenantContext | None) -> dict[str, Any]:
    """The ``error`` object of a 429: every detail for a level the viewer sees, else ``upstream_dict``."""
    if not sees(seen_by, error.tenant_id):
        return {"field": None, **error.upstream_dict()}
    return {"field": None, **error.as_dict(), "scope": "subtree", "retry_after": error.retry_after}


def api_answer(error: QuotaExceeded, request: Any) -> ErrorAnswer:
    """The 429 of a DRF view (metering's exception handler calls ``QuotaExceeded.api_answer``): the body of
    ``refusal_body`` for the request's viewer, and ``Retry-After``."""
    return ErrorAnswer(429, refusal_body(error, seen_by=refusal_viewer(error, request)), error.retry_after)


def refusal_viewer(error: QuotaExceeded, request: Any) -> TenantContext | None:
    """Who reads a refusal: the API key's tenant (when its subtree holds the blocking level), else the request's
    tenant context; ``None`` sees no level."""
    user = getattr(request, "user", None)
    if isinstance(user, TenantPrincipal):
        # The blocking level's lineage seen from the key's tenant: visible exactly when the key's subtree holds it.
        try:
            blocking = get_context(error.tenant_id, require_active=False)
        except TenantError:
            return None
        if not any(level.pk == user.tenant.pk for level in blocking.lineage):
            return None
        return blocking.seen_from(user.tenant.pk)
    tenant = getattr(request, "tenant", None)
    return tenant if isinstance(tenant, TenantContext) else None


def quota_exceeded_response(error: QuotaExceeded, *, seen_by: TenantContext | None) -> JsonResponse:
    body = refusal_body(error, seen_by=seen_by)
    response = JsonResponse({"error": body}, status=429)
    retry_after = error.retry_after
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    reset = f";t={retry_after}" if retry_after is not None else ""
    if body["scope"] == "upstream":
        response["RateLimit"] = f'"{UPSTREAM_POLICY}";r=0{reset}'
        return response
    name = f"{error.tenant_id}/{error.feature}/{error.period}"
    response["RateLimit-Policy"] = f'"{name}";q={_whole(error.limit)}'
    response["RateLimit"] = f'"{name}";r=0{reset}'
    return response


def error_response(status: int, code: str, field: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "field": field, "message": message}}, status=status)


def service_unavailable_response(error: BaseException, where: str = "quota enforcement") -> JsonResponse:
    """503 JSON (``{"error": {"code": "service_unavailable", ...}}``) with ``Retry-After``: a store is down."""
    return unavailable_response(error, where)
