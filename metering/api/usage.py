"""``GET /api/v1/usage``: a tenant's usage of one feature in a window, with each direct child's share."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from metering.events import units_to_quantity, utcnow
from metering.usage import get_usage, usage_by_tenant_and_feature
from metering.windows import PERIODS, Period, window
from tenants.lineage import get_context
from tenants.models import Tenant

from .base import ApiView, FeatureField, MomentField, TenantIdField, iso, query_params, tenant_in_scope
from .errors import ApiError
from .schema import RETRY_AFTER, error_responses

MAX_CHILDREN = 1000


class UsageQuerySerializer(serializers.Serializer):
    tenant_id = TenantIdField(required=False)
    feature = FeatureField()
    period = serializers.ChoiceField(
        choices=list(PERIODS),
        required=False,
        help_text="A UTC calendar window (default month); `total` is everything. Not with start/end.",
    )
    at = MomentField(required=False, help_text="The moment whose `period` window is meant (default: now).")
    start = MomentField(required=False, help_text="Start of an arbitrary range (inclusive), ISO-8601 with offset.")
    end = MomentField(required=False, help_text="End of an arbitrary range (exclusive), ISO-8601 with offset.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        ranged = "start" in attrs or "end" in attrs
        if ranged and ("period" in attrs or "at" in attrs):
            raise ApiError(400, "conflicting_parameters", "give period (and at) or start/end, not both", "period")
        if ranged and "start" in attrs and "end" in attrs and attrs["end"] < attrs["start"]:
            raise ApiError(400, "invalid_range", "end is before start", "end")
        return attrs


class ChildUsageSerializer(serializers.Serializer):
    tenant_id = serializers.CharField()
    total = serializers.CharField(help_text="The child's whole subtree, exact decimal string.")


class UsageSerializer(serializers.Serializer):
    tenant_id = serializers.CharField()
    feature = serializers.CharField()
    period = serializers.CharField(allow_null=True, help_text="null for a start/end range.")
    start = serializers.DateTimeField(allow_null=True)
    end = serializers.DateTimeField(allow_null=True)
    total = serializers.CharField(help_text="The tenant's whole subtree, exact decimal string.")
    children = ChildUsageSerializer(many=True, help_text="Each direct child's subtree usage, by tenant id.")
    children_truncated = serializers.BooleanField(help_text=f"More than {MAX_CHILDREN} children: the rest left out.")


def _quantity(value: Decimal) -> str:
    return format(value, "f")


class UsageView(ApiView):
    @extend_schema(
        operation_id="usage_retrieve",
        summary="Usage of a tenant's subtree, with a per-child breakdown",
        description="Usage is the sum of the tenant's whole subtree. Windows are UTC calendar windows "
        "(`hour`, `day`, `month`) holding `at` (default now), `total` for everything, or `[start, end)`.",
        parameters=[UsageQuerySerializer, RETRY_AFTER],
        responses={200: UsageSerializer, **error_responses()},
        tags=["usage"],
    )
    def get(self, request: Request) -> Response:
        params = query_params(request, UsageQuerySerializer)
        tenant = tenant_in_scope(self.principal, params.get("tenant_id"))
        feature: str = params["feature"]
        period: Period | None = None
        at: datetime = params.get("at") or utcnow()
        if "start" in params or "end" in params:
            start, end = params.get("start"), params.get("end")
        else:
            period = params.get("period", "month")
            assert period is not None
            try:
                start, end = window(period, at)
            except (OverflowError, ValueError):  # the window of a moment late in 9999 ends past year 9999
                raise ApiError(
                    400, "invalid_datetime", f"the {period} window of {iso(at)} ends after year 9999", "at"
                ) from None
        context = get_context(tenant.external_id, require_active=False)
        total = get_usage(context, feature, start, end)
        children = list(
            Tenant.objects.filter(parent=tenant)
            .order_by("external_id")
            .values_list("pk", "external_id")[: MAX_CHILDREN + 1]
        )
        truncated = len(children) > MAX_CHILDREN
        children = children[:MAX_CHILDREN]
        if period is not None:
            # One query over the rollups for every child (calendar windows are whole hours).
            by_child = usage_by_tenant_and_feature([pk for pk, _ in children], period, at)
            shares = [
                (external_id, by_child.get(pk, {}).get(feature, units_to_quantity(0))) for pk, external_id in children
            ]
        else:
            shares = [(external_id, get_usage(external_id, feature, start, end)) for _, external_id in children]
        return Response(
            {
                "tenant_id": tenant.external_id,
                "feature": feature,
                "period": period,
                "start": iso(start),
                "end": iso(end),
                "total": _quantity(total),
                "children": [{"tenant_id": child, "total": _quantity(used)} for child, used in shares],
                "children_truncated": truncated,
            }
        )
