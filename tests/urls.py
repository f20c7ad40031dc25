"""Views used by the middleware tests."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import path


def _describe(request: HttpRequest) -> JsonResponse:
    tenant = request.tenant  # type: ignore[attr-defined]
    if tenant is None:
        return JsonResponse({"tenant": None})
    return JsonResponse({"tenant": tenant.tenant_id, "lineage": list(tenant.lineage_ids), "exempt": tenant.exempt})


def whoami(request: HttpRequest) -> JsonResponse:
    return _describe(request)


async def whoami_async(request: HttpRequest) -> JsonResponse:
    return _describe(request)


def query_resolver(request: HttpRequest) -> str | None:
    return request.GET.get("tenant")


urlpatterns = [path("whoami", whoami), path("whoami-async", whoami_async)]
