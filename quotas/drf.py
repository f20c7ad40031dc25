"""Django REST framework: a permission class that consumes quota, answering 429 when a level is full.

class CompletionView(APIView):
    permission_classes = [QuotaPermission]
    quota_feature = "api_calls"
    quota_quantity = 1          # or a callable of the request
"""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpResponse
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from .decorators import decide_for_request
from .http import add_quota_headers


class QuotaExceededAPIError(APIException):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "quota_exceeded"

    def __init__(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        super().__init__(detail=body)
        self.detail = body  # keep the body as the decorator's, not DRF's ErrorDetail wrapping
        self.headers = headers
        retry_after = headers.get("Retry-After")
        self.wait = int(retry_after) if retry_after else None  # DRF's handler turns this into Retry-After


class ServiceUnavailableAPIError(APIException):
    """A data store is down: 503 with the decorator's body; ``wait`` becomes ``Retry-After`` (DRF's handler too)."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "service_unavailable"

    def __init__(self, body: dict[str, Any], retry_after: int) -> None:
        super().__init__(detail=body)
        self.detail = body
        self.wait = retry_after


class QuotaPermission(BasePermission):
    message = "quota exceeded"

    def has_permission(self, request: Request, view: Any) -> bool:
        feature = getattr(view, "quota_feature", None)
        if feature is None:
            return True
        outcome = decide_for_request(request._request, feature, getattr(view, "quota_quantity", 1))
        if isinstance(outcome, HttpResponse):
            body = json.loads(outcome.content)
            if outcome.status_code == 429:
                names = ("Retry-After", "RateLimit-Policy", "RateLimit")
                headers = {name: outcome[name] for name in names if outcome.has_header(name)}
                request._request._xaas_quota_headers = headers  # type: ignore[attr-defined]
                raise QuotaExceededAPIError(body, headers)
            if outcome.status_code == 503:
                raise ServiceUnavailableAPIError(body, int(outcome["Retry-After"]))
            raise _BadRequest(body, outcome.status_code, outcome.get("WWW-Authenticate"))
        request._request._xaas_quota_decision = outcome  # type: ignore[attr-defined]
        return True


class _BadRequest(APIException):
    def __init__(self, body: dict[str, Any], status_code: int, auth_header: str | None = None) -> None:
        super().__init__(detail=body)
        self.detail = body
        self.status_code = status_code
        if auth_header:  # a 401: DRF's exception handlers turn this into WWW-Authenticate
            self.auth_header = auth_header


class QuotaHeadersMixin:
    """For DRF views using ``QuotaPermission``: adds the ``RateLimit`` fields to allowed and refused answers."""

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        decision = getattr(request._request, "_xaas_quota_decision", None)
        if decision is not None:
            return add_quota_headers(response, decision, seen_by=getattr(request._request, "tenant", None))
        for name, value in getattr(request._request, "_xaas_quota_headers", {}).items():
            response[name] = value
        return response
