"""Metering's REST API routes (events, usage). Include them under a version prefix, after the routes of the apps
above metering that share it (quotas' endpoints: ``quotas.urls``)::

    path("api/v1/", include("quotas.urls")),
    path("api/v1/", include("metering.api.urls")),

Paths have no trailing slash; anything else under the prefix answers a JSON 404 (the last route here).
"""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import path, re_path
from django.views.decorators.csrf import csrf_exempt

from . import schema  # noqa: F401  (registers the API-key security scheme with drf-spectacular)
from .errors import json_error
from .events import EventsView
from .features import FeatureListView
from .usage import UsageView

app_name = "xaas_api"


@csrf_exempt  # any method gets the JSON 404, not Django's HTML CSRF 403 (the API authenticates by key only)
def not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    """The JSON 404 of every path under the prefix that names no endpoint, whatever the method."""
    return json_error(404, "not_found", f"no API endpoint at {request.path} (paths take no trailing slash)")


urlpatterns = [
    path("events", EventsView.as_view(), name="events"),
    path("usage", UsageView.as_view(), name="usage"),
    path("features", FeatureListView.as_view(), name="features"),
    re_path(r"^(?P<rest>.*)$", not_found),
]
