"""Every API error is JSON: ``{"error": {"code": <stable>, "field": <offending field or null>, "message": ...}}``.

``exception_handler`` is DRF's ``EXCEPTION_HANDLER`` for the API views (they use it whatever the host project's
setting) and may serve a whole project: it also shapes DRF's own errors (validation, parsing, authentication,
404, 405, 415), the named errors of tenants and metering, and any ``AnswerableError`` of a higher app (quotas'
``QuotaExceeded``). Nothing becomes a 500 page: an unexpected exception is logged and answered with a JSON 500.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import Http404, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import set_rollback

from metering.exceptions import AnswerableError, InvalidUsageEvent
from tenants.exceptions import InactiveTenant, InvalidApiKey, TenantError, UnknownTenant
from tenants.unavailable import CODE as UNAVAILABLE_CODE
from tenants.unavailable import MESSAGE as UNAVAILABLE_MESSAGE
from tenants.unavailable import RETRY_AFTER_SECONDS, is_store_unavailable, log_unavailable

logger = logging.getLogger("metering.api")


class ApiError(exceptions.APIException):
    """An error answered as ``{"error": {"code", "field", "message", **extra}}`` with ``status_code``."""

    def __init__(self, status_code: int, code: str, message: str, field: str | None = None, **extra: Any) -> None:
        super().__init__(detail=message, code=code)
        self.status_code = status_code
        self.code = code
        self.field = field
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "field": self.field, "message": self.message, **self.extra}}


def not_found(field: str | None, message: str = "not found") -> ApiError:
    return ApiError(status.HTTP_404_NOT_FOUND, "not_found", message, field)


def unknown_tenant(tenant_id: object, field: str = "tenant_id") -> ApiError:
    """The answer for a tenant that does not exist *and* for one outside the caller's subtree: identical."""
    return ApiError(status.HTTP_404_NOT_FOUND, "unknown_tenant", f"unknown tenant {tenant_id!r}", field)


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> Response:
    return Response(error.body(), status=error.status_code, headers=headers)


def json_error(status_code: int, code: str, message: str, field: str | None = None) -> JsonResponse:
    """The API's error body from a plain Django view (outside DRF): 404 catch-alls, CSRF failures, 500 pages."""
    return JsonResponse({"error": {"code": code, "field": field, "message": message}}, status=status_code)


def _first_error(detail: Any, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], Any] | None:
    if isinstance(detail, dict):
        for key, value in detail.items():
            found = _first_error(value, (*path, str(key)))
            if found is not None:
                return found
        return None
    if isinstance(detail, list):
        for index, value in enumerate(detail):
            nested = isinstance(value, dict | list)
            found = _first_error(value, (*path, str(index)) if nested else path)
            if found is not None:
                return found
        return None
    return path, detail


def _from_validation(exc: exceptions.ValidationError) -> ApiError:
    found = _first_error(exc.detail)
    if found is None:  # pragma: no cover (DRF never raises an empty ValidationError)
        return ApiError(400, "invalid", "invalid input")
    path, first = found
    field = ".".join(path) if path and path[0] != "non_field_errors" else None
    code = getattr(first, "code", None) or "invalid"
    return ApiError(400, str(code), str(first), field, details=exc.detail)


def _translate(exc: Exception) -> Exception:
    """Django's and the apps' named errors as ``ApiError``; anything else unchanged."""
    if is_store_unavailable(exc):  # the database, or Redis with no fallback left, is down: retry, not a bug
        log_unavailable(exc, "api")
        unavailable = ApiError(503, UNAVAILABLE_CODE, UNAVAILABLE_MESSAGE, None)
        unavailable.wait = RETRY_AFTER_SECONDS  # type: ignore[attr-defined]
        return unavailable
    if isinstance(exc, Http404):
        return not_found(None, str(exc) or "not found")
    if isinstance(exc, DjangoPermissionDenied):
        return ApiError(403, "permission_denied", str(exc) or "permission denied")
    if isinstance(exc, RequestDataTooBig):
        return ApiError(413, "payload_too_large", "the request body is too large", "body")
    if isinstance(exc, SuspiciousOperation):  # Django's request bounds: too many fields or files, a bad host ...
        return ApiError(400, "bad_request", str(exc) or "the request is malformed")
    if isinstance(exc, InvalidApiKey):
        return ApiError(401, exc.code, str(exc), exc.field)
    if isinstance(exc, UnknownTenant):
        return ApiError(404, exc.code, str(exc), exc.field)
    if isinstance(exc, InactiveTenant):
        return ApiError(403, exc.code, str(exc), exc.field)
    if isinstance(exc, TenantError | InvalidUsageEvent):
        return ApiError(400, exc.code, str(exc), exc.field)
    return exc


def _answered(exc: AnswerableError, request: Any) -> ApiError:
    """The answer an error of a higher app gives for itself (``quotas.QuotaExceeded``: a 429 that names the blocking
    level only to a caller whose key, or request tenant, covers it)."""
    answer = exc.api_answer(request)
    body = dict(answer.error)
    code, message, field = body.pop("code"), body.pop("message"), body.pop("field", None)
    error = ApiError(answer.status, code, message, field, **body)
    error.wait = answer.retry_after  # type: ignore[attr-defined]
    return error


_CODES = {
    exceptions.ParseError: ("invalid_json", "body"),
    exceptions.UnsupportedMediaType: ("unsupported_media_type", "Content-Type"),
    exceptions.NotAuthenticated: ("not_authenticated", "Authorization"),
    exceptions.AuthenticationFailed: ("invalid_api_key", "Authorization"),
    exceptions.MethodNotAllowed: ("method_not_allowed", None),
    exceptions.NotAcceptable: ("not_acceptable", "Accept"),
    exceptions.NotFound: ("not_found", None),
    exceptions.Throttled: ("throttled", "Authorization"),  # the API key's rate (metering.api.throttling)
}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    exc = _answered(exc, context.get("request")) if isinstance(exc, AnswerableError) else _translate(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, exceptions.APIException):
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header  # type: ignore[attr-defined]
        wait = getattr(exc, "wait", None)
        if wait:
            headers["Retry-After"] = f"{int(wait)}"
    set_rollback()
    if isinstance(exc, ApiError):
        return error_response(exc, headers)
    if isinstance(exc, exceptions.ValidationError):
        return error_response(_from_validation(exc), headers)
    if isinstance(exc, exceptions.APIException):
        if isinstance(exc.detail, dict) and "error" in exc.detail:
            return Response(exc.detail, status=exc.status_code, headers=headers)  # already shaped (quotas.drf)
        code, field = next(
            (pair for kind, pair in _CODES.items() if isinstance(exc, kind)),
            (None, None),
        )
        detail_code = exc.get_codes() if not isinstance(exc.detail, dict | list) else None
        if isinstance(exc, exceptions.AuthenticationFailed) and isinstance(detail_code, str):
            code = detail_code if detail_code != "authentication_failed" else code
        elif code is None:
            code = detail_code if isinstance(detail_code, str) else exc.default_code
        field = getattr(exc, "field", field)
        message = str(exc.detail) if not isinstance(exc.detail, dict | list) else str(exc.default_detail)
        return Response(
            {"error": {"code": code, "field": field, "message": message}}, status=exc.status_code, headers=headers
        )
    logger.exception("unexpected error in an API view", exc_info=exc)
    return Response(
        {"error": {"code": "server_error", "field": None, "message": "an unexpected error occurred"}},
        status=status.HTTP_500_INTERNAL_SERVER_ERROR,
    )
