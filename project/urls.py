from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from metering.api.errors import json_error

from . import demo


@csrf_exempt  # any method: a JSON 404, never Django's HTML page (nor its CSRF 403 for a POST)
def json_not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Paths under /api/ and /demo/ that name nothing (the API's own catch-all covers /api/v1/)."""
    return json_error(404, "not_found", f"nothing at {request.path}")


urlpatterns = [
    path("admin/", admin.site.urls),
    path("demo/completions", demo.completions, name="demo-completions"),
    path("demo/completions-async", demo.completions_async, name="demo-completions-async"),
    path("api/v1/", include("metering.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    re_path(r"^(?:api|demo)(?:/(?P<rest>.*))?$", json_not_found),
]

handler404 = "project.errors.page_not_found"
handler500 = "project.errors.server_error"
