"""HTTP faces of a decision: 429 bodies and the ``Retry-After`` / IETF ``RateLimit-Policy`` / ``RateLimit`` fields;
503 when a data store is down."""

from __future__ import annotations

import math
from decimal import Decimal

from django.http import HttpResponse, JsonResponse

from metering.events import utcnow
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


def policy_header(decision: Decision) -> str:
    items = []
    for status in decision.statuses:
        item = f'"{_policy_name(status)}";q={_whole(status.limit)}'
        if status.reset_at is not None and status.window_start is not None:
            item += f";w={int((status.reset_at - status.window_start).total_seconds())}"
        items.append(item)
    return ", ".join(items)


def rate_limit_header(status: QuotaStatus) -> str:
    header = f'"{_policy_name(status)}";r={_whole(status.remaining)}'
    seconds = _seconds_left(status)
    return header + (f";t={seconds}" if seconds is not None else "")


def add_quota_headers(response: HttpResponse, decision: Decision) -> HttpResponse:
    """Tell an allowed client how much room is left (the tightest quota) and which policies apply."""
    tightest = decision.tightest
    if tightest is not None:
        response["RateLimit-Policy"] = policy_header(decision)
        response["RateLimit"] = rate_limit_header(tightest)
    return response


def quota_exceeded_response(error: QuotaExceeded) -> JsonResponse:
    response = JsonResponse({"error": error.as_dict()}, status=429)
    retry_after = error.retry_after
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    name = f"{error.tenant_id}/{error.feature}/{error.period}"
    response["RateLimit-Policy"] = f'"{name}";q={_whole(error.limit)}'
    response["RateLimit"] = f'"{name}";r=0' + (f";t={retry_after}" if retry_after is not None else "")
    return response


def error_response(status: int, code: str, field: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "field": field, "message": message}}, status=status)


def service_unavailable_response(error: BaseException, where: str = "quota enforcement") -> JsonResponse:
    """503 JSON (``{"error": {"code": "service_unavailable", ...}}``) with ``Retry-After``: a store is down."""
    return unavailable_response(error, where)
