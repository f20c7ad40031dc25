from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from metering.api.errors import json_error

from . import demo


@csrf_exempt  # any method: a JSON 404, never Django's HTML page (nor its CSRF 403 for a POST)
def json_not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Paths under /api/ and /demo/ that name nothing (the API's own catch-all covers /api/v1/)."""
    return json_error(404, "not_found", f"nothing at {request.path}")


def json_errors(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """The schema and docs views render their errors as YAML or HTML (their renderers); under /api/ they are JSON,
    with the same body the exception handler made (and its ``Allow`` / ``WWW-Authenticate`` headers)."""

    @wraps(view)  # keeps csrf_exempt, as DRF set it
    def answered(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = view(request, *args, **kwargs)
        data = getattr(response, "data", None)
        if response.status_code >= 400 and isinstance(data, dict) and "error" in data:
            shaped = JsonResponse(data, status=response.status_code)
            for name in ("Allow", "WWW-Authenticate", "Retry-After"):
                if response.has_header(name):
                    shaped[name] = response[name]
            return shaped
        return response

    return answered


READ = ["get", "head"]


def landing(request: HttpRequest) -> HttpResponse:
    """``/``: what the demo is and where to click (also the admin's "View site" link)."""
    return render(request, "landing.html", {"base_url": request.build_absolute_uri("/").rstrip("/")})


urlpatterns = [
    path("", landing, name="landing"),
    path("admin/", admin.site.urls),
    path("demo/completions", demo.completions, name="demo-completions"),
    path("demo/completions-async", demo.completions_async, name="demo-completions-async"),
    path("api/v1/", include("quotas.urls")),  # before metering's: its last route is the JSON 404 of the prefix
    path("api/v1/", include("metering.api.urls")),
    # GET and HEAD only: OPTIONS would render DRF's metadata through the docs' HTML template (a 500).
    path("api/schema/", json_errors(SpectacularAPIView.as_view(http_method_names=READ)), name="schema"),
    path(
        "api/docs/",
        json_errors(SpectacularSwaggerView.as_view(url_name="schema", http_method_names=READ)),
        name="swagger-ui",
    ),
    re_path(r"^(?:api|demo)(?:/(?P<rest>.*))?$", json_not_found),
]

handler400 = "project.errors.bad_request"
handler403 = "project.errors.permission_denied"
handler404 = "project.errors.page_not_found"
handler500 = "project.errors.server_error"
