"""The example project's error pages: JSON under ``/api/`` and ``/demo/`` (clients of those read JSON, never an HTML
page), Django's own pages elsewhere (the admin).

Wired in ``project/urls.py`` (``handler400``, ``handler403``, ``handler404``, ``handler500``) and
``settings.CSRF_FAILURE_VIEW``.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views import csrf, defaults

from metering.api.errors import json_error

JSON_PREFIXES = ("/api/", "/demo/")


def wants_json(request: HttpRequest) -> bool:
    """Whether ``request`` is under a prefix whose answers are JSON."""
    return request.path.startswith(JSON_PREFIXES)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """403 for a failed CSRF check. The API and the demo are CSRF-exempt (they authenticate by API key or header,
    never by a cookie), so under them this answers only a view that forgot to be: as JSON all the same."""
    if wants_json(request):
        return json_error(403, "csrf_failed", f"CSRF verification failed: {reason}")
    return csrf.csrf_failure(request, reason)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """``handler400``: Django's own refusals before any view (a Host outside ALLOWED_HOSTS, too many fields)."""
    if wants_json(request):
        return json_error(400, "bad_request", str(exception) or "the request is malformed")
    return defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    """``handler403``."""
    if wants_json(request):
        return json_error(403, "permission_denied", str(exception) or "permission denied")
    return defaults.permission_denied(request, exception)


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler404`` (with ``DEBUG`` off)."""
    if wants_json(request):
        return json_error(404, "not_found", f"nothing at {request.path}")
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    """``handler500`` (with ``DEBUG`` off); Django has logged the traceback (``django.request``) before this."""
    if wants_json(request):
        return json_error(500, "server_error", "an unexpected error occurred")
    return defaults.server_error(request)
