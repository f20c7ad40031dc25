"""``GET /api/v1/features``: the registered features (``metering.features``), site-wide and the same for every key.

The registry names the platform's products, never a tenant's data, so any valid key may read it.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from metering.conf import metering_settings
from metering.models import FeatureDefinition

from .base import ApiPagination, ApiView, QueryIntegerField, query_params
from .schema import RETRY_AFTER, error_responses


class FeatureSerializer(serializers.ModelSerializer):
    property = serializers.CharField(source="property_name", help_text="unique_count: the counted metadata key.")

    class Meta:
        model = FeatureDefinition
        fields = ["name", "aggregation", "unit", "property", "rolls_up", "description"]


class FeatureListQuerySerializer(serializers.Serializer):
    page = QueryIntegerField(required=False, min_value=1, max_value=10**18 - 1)  # 18 ASCII digits at most
    page_size = QueryIntegerField(required=False, min_value=1, max_value=ApiPagination.max_page_size)


class FeatureListView(ApiView, generics.ListAPIView):
    serializer_class = FeatureSerializer
    pagination_class = ApiPagination

    def get_queryset(self) -> QuerySet[FeatureDefinition]:
        return FeatureDefinition.objects.using(metering_settings.DATABASE_ALIAS).order_by("name")

    @extend_schema(
        operation_id="features_list",
        summary="The registered features: unit and aggregation",
        description="Unregistered features are sums when `METERING['FEATURE_REGISTRY']` is `open` (the default) and "
        "refused when it is `closed`.",
        parameters=[FeatureListQuerySerializer, RETRY_AFTER],
        responses={200: FeatureSerializer(many=True), **error_responses()},
        tags=["features"],
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        query_params(request, FeatureListQuerySerializer)  # a bad page or page_size is a 400 naming it
        return self.list(request, *args, **kwargs)
