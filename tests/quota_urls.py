"""Views that exercise every enforcement point (used by test_quota_http)."""

from __future__ import annotations

import json

from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.utils.decorators import method_decorator
from django.views import View
from rest_framework.response import Response
from rest_framework.views import APIView

from quotas.decorators import enforce_quota
from quotas.drf import QuotaHeadersMixin, QuotaPermission
from quotas.handler import QuotaPolicyHandler


def _items(request: HttpRequest) -> int:
    return len(json.loads(request.body or b"{}").get("items", []))


@enforce_quota("api_calls")
def sync_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


@enforce_quota("api_calls", quantity=2)
async def async_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


@enforce_quota("items", quantity=_items)
def batch_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


@method_decorator(enforce_quota("api_calls"), name="dispatch")
class ClassView(View):
    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"ok": True})


@method_decorator(enforce_quota("api_calls"), name="dispatch")
class DecoratedAPIView(APIView):
    authentication_classes: list[type] = []
    permission_classes: list[type] = []

    def get(self, request):
        return Response({"ok": True})


class PermissionAPIView(QuotaHeadersMixin, APIView):
    authentication_classes: list[type] = []
    permission_classes = [QuotaPermission]
    quota_feature = "api_calls"

    def get(self, request):
        return Response({"ok": True})


def routed_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


def raising_view(request: HttpRequest) -> JsonResponse:
    QuotaPolicyHandler(request.tenant).consume("api_calls", 5)  # type: ignore[attr-defined]
    return JsonResponse({"ok": True})


urlpatterns = [
    path("sync", sync_view),
    path("async", async_view),
    path("batch", batch_view),
    path("class", ClassView.as_view()),
    path("drf-decorated", DecoratedAPIView.as_view()),
    path("drf-permission", PermissionAPIView.as_view()),
    path("routed/by-name", routed_view, name="routed-by-name"),
    path("metered/anything", routed_view),
    path("free", routed_view),
    path("raising", raising_view),
]
