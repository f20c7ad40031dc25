from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from . import demo

urlpatterns = [
    path("admin/", admin.site.urls),
    path("demo/completions", demo.completions, name="demo-completions"),
    path("demo/completions-async", demo.completions_async, name="demo-completions-async"),
    path("api/v1/", include("metering.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
]
