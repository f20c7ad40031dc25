"""The quota and entitlement endpoints of the REST API. Include them under the same version prefix as metering's,
*before* metering's routes (those end with the JSON 404 of every other path under the prefix)::

    path("api/v1/", include("quotas.urls")),
    path("api/v1/", include("metering.api.urls")),

Paths have no trailing slash.
"""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from metering.api import schema  # noqa: F401  (registers the API-key security scheme with drf-spectacular)

from .api import EntitlementsView, QuotaViewSet

app_name = "xaas_quotas_api"

router = SimpleRouter(trailing_slash=False)
router.register("quotas", QuotaViewSet, basename="quota")

urlpatterns = [
    path("entitlements", EntitlementsView.as_view(), name="entitlements"),
    *router.urls,
]
