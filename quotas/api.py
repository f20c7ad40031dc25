"""``/api/v1/quotas`` (list, create, retrieve, update, delete) and ``GET /api/v1/entitlements``.

**No self-escalation**: a key reads the quotas of its whole subtree, but creates, changes and deletes quotas only
on tenants *strictly below* its own tenant — never on its own tenant (403 ``self_escalation_forbidden``) and never
on an ancestor or another tree (404, as if it did not exist). So no tenant can raise its own limit, and a limit
set above a tenant binds everything below it whatever the tenant sets for its children.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field, extend_schema_view
from rest_framework import serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from metering import rollups
from metering.api.base import (
    QUANTITY_MAX_LENGTH,
    QUANTITY_PATTERN,
    ApiPagination,
    ApiView,
    FeatureField,
    QuantityField,
    QueryIntegerField,
    StrictBooleanField,
    StrictIntegerField,
    TenantIdField,
    iso,
    query_params,
    reject_unknown,
    tenant_in_scope,
)
from metering.api.errors import ApiError, unknown_tenant
from metering.api.schema import BODY_STATUSES, RETRY_AFTER, ClosedSerializer, error_responses
from metering.conf import metering_settings
from metering.events import units_to_quantity, utcnow
from metering.exceptions import InvalidQuantity
from tenants.lineage import get_context

from .handler import QuotaPolicyHandler
from .ledger import QuotaStatus, reserved_units
from .models import MAX_LIMIT_UNITS, QuotaLimit, default_thresholds, limit_to_units
from .rules import rules_for

PERIODS = [choice.value for choice in QuotaLimit.Period]
ENFORCEMENTS = [choice.value for choice in QuotaLimit.Enforcement]
IDENTITY_FIELDS = ("tenant_id", "feature", "period")


LIMIT_MAX_LENGTH = len(str(MAX_LIMIT_UNITS // 10**6)) + 7  # 18 digits, ".", 6 decimals


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "pattern": QUANTITY_PATTERN, "maxLength": LIMIT_MAX_LENGTH},
            # 999999999999999999.999999 is no double: the bound is stated as "below 10**18" (OpenAPI 3.0 form).
            {"type": "number", "minimum": 0, "maximum": (MAX_LIMIT_UNITS + 1) // 10**6, "exclusiveMaximum": True},
        ],
        "description": "A non-negative decimal with at most 6 decimal places, up to 999999999999999999.999999 "
        "(a limit bounds a window's total, so it may exceed one fact's MAX_QUANTITY); a string keeps it exact. "
        "On SQLite at most 15 significant digits.",
        "example": "1000000",
    }
)
class LimitField(QuantityField):
    """A quota limit: the quantity grammar, up to what the ``limit`` column holds (``quotas.models``)."""

    def to_internal_value(self, data: Any) -> Decimal:
        if isinstance(data, str) and len(data) > LIMIT_MAX_LENGTH:
            raise serializers.ValidationError(f"limit must be at most {LIMIT_MAX_LENGTH} characters", code=self.code)
        try:
            return units_to_quantity(limit_to_units(data))
        except InvalidQuantity as error:
            raise serializers.ValidationError(str(error).replace("quantity", "limit", 1), code=self.code) from None

    def to_representation(self, value: Any) -> str:
        return format(units_to_quantity(limit_to_units(Decimal(value))), "f")


class QuotaSerializer(ClosedSerializer):
    id = serializers.IntegerField(read_only=True)
    tenant_id = TenantIdField(help_text="A tenant strictly below the API key's own tenant.")
    feature = FeatureField()
    limit = LimitField(code="invalid_limit", help_text="At most this much per window; 0 blocks everything.")
    period = serializers.ChoiceField(choices=PERIODS, default=QuotaLimit.Period.MONTH)
    enforcement = serializers.ChoiceField(
        choices=ENFORCEMENTS, default=QuotaLimit.Enforcement.HARD, help_text="hard blocks; soft records and warns."
    )
    warning_thresholds = serializers.ListField(
        child=StrictIntegerField(min_value=1, max_value=100),
        max_length=20,
        default=default_thresholds,
        help_text="Percentages of the limit that send quota_threshold_reached.",
    )
    is_active = StrictBooleanField(default=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)

    def to_representation(self, instance: QuotaLimit) -> dict[str, Any]:
        return {
            "id": instance.pk,
            "tenant_id": instance.tenant.external_id,
            "feature": instance.feature,
            "limit": format(units_to_quantity(instance.limit_units), "f"),
            "period": instance.period,
            "enforcement": instance.enforcement,
            "warning_thresholds": list(instance.warning_thresholds or []),
            "is_active": instance.is_active,
            "created_at": iso(instance.created_at),
            "updated_at": iso(instance.updated_at),
        }


class QuotaUpdateSerializer(QuotaSerializer):
    """A quota's identity (tenant, feature, period) is fixed; send it back unchanged or leave it out."""

    tenant_id = TenantIdField(required=False, help_text="Immutable.")
    feature = FeatureField(required=False, help_text="Immutable.")
    period = serializers.ChoiceField(choices=PERIODS, required=False, help_text="Immutable.")


WRITABLE = frozenset(name for name, field in QuotaSerializer().fields.items() if not field.read_only)


class QuotaListQuerySerializer(serializers.Serializer):
    tenant_id = TenantIdField(required=False, help_text="Only this tenant's quotas.")
    feature = FeatureField(required=False, help_text="Only quotas on this feature.")
    period = serializers.ChoiceField(choices=PERIODS, required=False)
    page = QueryIntegerField(required=False, min_value=1, max_value=10**18 - 1)  # 18 ASCII digits at most
    page_size = QueryIntegerField(required=False, min_value=1, max_value=ApiPagination.max_page_size)


def _model_errors(error: DjangoValidationError) -> ApiError:
    messages = error.message_dict if hasattr(error, "error_dict") else {"__all__": error.messages}
    field, texts = next(iter(messages.items()))
    return ApiError(
        400,
        f"invalid_{field}" if field != "__all__" else "invalid",
        " ".join(texts),
        None if field == "__all__" else field,
        details=messages,
    )


def _save(quota: QuotaLimit, *, update: bool = False) -> None:
    """``update``: the row must still exist. Django's plain ``save`` would INSERT it again under its old id when a
    concurrent DELETE removed it, bringing a deleted quota back: a vanished row is a 404 instead."""
    try:
        quota.full_clean(exclude=["tenant"], validate_unique=False, validate_constraints=False)
    except DjangoValidationError as error:
        raise _model_errors(error) from None
    try:
        with transaction.atomic():
            quota.save(force_update=update)
    except IntegrityError:
        raise _exists(quota) from None
    except DatabaseError as error:
        if update and "did not affect any rows" in str(error):
            raise ApiError(404, "not_found", f"no quota {quota.pk!r}", "id") from None
        raise


def _exists(quota: QuotaLimit) -> ApiError:
    return ApiError(
        409,
        "quota_exists",
        f"{quota.tenant.external_id} already has a {quota.period} quota on {quota.feature}; change that one",
        "feature",
    )


def _forbidden() -> ApiError:
    return ApiError(
        403,
        "self_escalation_forbidden",
        "an API key may create, change or delete quotas only of tenants strictly below its own tenant",
        "tenant_id",
    )


_SELF_ESCALATION = "The quota's tenant is the key's own tenant (or the key's tenant is deactivated)."
_WRITE_ERRORS = error_responses(*BODY_STATUSES, 409, s403=_SELF_ESCALATION)
_CHANGE_ERRORS = error_responses(*BODY_STATUSES, s403=_SELF_ESCALATION)
MAX_ID = 2**63 - 1  # bigint: a larger id names no quota
QUOTA_ID = OpenApiParameter(
    "id",
    {"type": "integer", "minimum": 1, "maximum": MAX_ID},
    OpenApiParameter.PATH,
    description="The quota's id (in the key's subtree).",
)


@extend_schema_view(
    list=extend_schema(
        summary="Quotas in the key's subtree",
        parameters=[QuotaListQuerySerializer, RETRY_AFTER],
        responses={200: QuotaSerializer(many=True), **error_responses()},
    ),
    create=extend_schema(
        summary="Create a quota on a tenant strictly below the key's own",
        request=QuotaSerializer,
        parameters=[RETRY_AFTER],
        responses={201: QuotaSerializer, **_WRITE_ERRORS},
    ),
    retrieve=extend_schema(
        summary="One quota",
        parameters=[QUOTA_ID, RETRY_AFTER],
        responses={200: QuotaSerializer, **error_responses()},
    ),
    update=extend_schema(
        summary="Change a quota's limit, enforcement, thresholds or state",
        request=QuotaUpdateSerializer,
        parameters=[QUOTA_ID, RETRY_AFTER],
        responses={200: QuotaSerializer, **_CHANGE_ERRORS},
    ),
    partial_update=extend_schema(
        summary="Change some of a quota's limit, enforcement, thresholds or state",
        request=QuotaUpdateSerializer,
        parameters=[QUOTA_ID, RETRY_AFTER],
        responses={200: QuotaSerializer, **_CHANGE_ERRORS},
    ),
    destroy=extend_schema(
        summary="Delete a quota",
        parameters=[QUOTA_ID, RETRY_AFTER],
        responses={204: None, **error_responses(s403=_SELF_ESCALATION)},
    ),
)
@extend_schema(tags=["quotas"])
class QuotaViewSet(ApiView, viewsets.GenericViewSet):
    """Quotas of the key's subtree; writes only strictly below the key's own tenant (no self-escalation)."""

    serializer_class = QuotaSerializer
    pagination_class = ApiPagination
    queryset = QuotaLimit.objects.none()  # the real one is get_queryset: the key's subtree
    lookup_value_regex = "[0-9]+"  # ASCII digits ("³" is a digit to str.isdigit, not to int)

    def get_queryset(self) -> QuerySet[QuotaLimit]:
        return (
            QuotaLimit.objects.select_related("tenant")
            .filter(tenant__path__startswith=self.principal.tenant.path)
            .order_by("tenant__path", "feature", "period", "pk")
        )

    def get_object(self) -> QuotaLimit:
        raw = str(self.kwargs.get("pk", ""))
        number = int(raw) if re.fullmatch(r"[0-9]{1,19}", raw) else 0
        quota = self.get_queryset().filter(pk=number).first() if 0 < number <= MAX_ID else None
        if quota is None:
            # A quota outside the subtree is answered like one that never existed.
            raise ApiError(404, "not_found", f"no quota {raw!r}", "id")
        return quota

    def list(self, request: Request) -> Response:
        params = query_params(request, QuotaListQuerySerializer)
        quotas = self.get_queryset()
        if "tenant_id" in params:
            quotas = quotas.filter(tenant=tenant_in_scope(self.principal, params["tenant_id"]))
        if "feature" in params:
            quotas = quotas.filter(feature=params["feature"])
        if "period" in params:
            quotas = quotas.filter(period=params["period"])
        page = self.paginate_queryset(quotas)
        assert page is not None  # the pagination class is set
        return self.get_paginated_response([QuotaSerializer().to_representation(quota) for quota in page])

    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(QuotaSerializer().to_representation(self.get_object()))

    def create(self, request: Request) -> Response:
        data = self._body(request)
        serializer = QuotaSerializer(data=data)
        serializer.is_valid(raise_exception=True)
        values = dict(serializer.validated_data)
        tenant = tenant_in_scope(self.principal, values.pop("tenant_id"))
        if not self.principal.manages(tenant):
            raise _forbidden()
        quota = QuotaLimit(tenant=tenant, **values)
        if QuotaLimit.objects.filter(tenant=tenant, feature=quota.feature, period=quota.period).exists():
            raise _exists(quota)
        _save(quota)
        return Response(QuotaSerializer().to_representation(quota), status=status.HTTP_201_CREATED)

    def update(self, request: Request, pk: str | None = None, partial: bool = False) -> Response:
        quota = self.get_object()
        if not self.principal.manages(quota.tenant):
            raise _forbidden()
        data = self._body(request)
        serializer = QuotaUpdateSerializer(data=data, partial=partial)
        serializer.is_valid(raise_exception=True)
        values = dict(serializer.validated_data)
        current = {"tenant_id": quota.tenant.external_id, "feature": quota.feature, "period": quota.period}
        for name in IDENTITY_FIELDS:
            if name in values and values.pop(name) != current[name]:
                raise ApiError(
                    400,
                    "immutable_field",
                    f"{name} cannot change (it is the quota's identity): delete this quota and create another",
                    name,
                )
        for name, value in values.items():
            setattr(quota, name, value)
        _save(quota, update=True)
        return Response(QuotaSerializer().to_representation(quota))

    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        return self.update(request, pk, partial=True)

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        quota = self.get_object()
        if not self.principal.manages(quota.tenant):
            raise _forbidden()
        quota.delete()
        return Response(status=status.HTTP_204_NO_CONTENT)

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        data = request.data
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_body", "the body must be a JSON object", "body")
        reject_unknown(data, WRITABLE)
        return dict(data)


# ---- entitlements ----


@extend_schema_field(
    {"type": "string", "pattern": QUANTITY_PATTERN, "maxLength": QUANTITY_MAX_LENGTH, "example": "12.5"}
)
class QueryQuantityField(QuantityField):
    """A quantity in a query string: text only, so the schema declares the string form alone (a query has no JSON
    numbers, and ``1e-38`` written in one is refused like any exponent)."""


class EntitlementQuerySerializer(serializers.Serializer):
    tenant_id = TenantIdField(required=False)
    feature = FeatureField()
    quantity = QueryQuantityField(required=False, help_text="How much the tenant would use (default 1).")


class EntitlementQuotaSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    period = serializers.ChoiceField(choices=PERIODS)
    enforcement = serializers.ChoiceField(choices=ENFORCEMENTS)
    limit = serializers.CharField()
    used = serializers.CharField(help_text="Usage in the current window plus open reservations.")
    remaining = serializers.CharField()
    reset_at = serializers.DateTimeField(allow_null=True, help_text="End of the window; null for total.")
    allowed = serializers.BooleanField(help_text="`quantity` fits (soft quotas always allow).")


class EntitlementLevelSerializer(serializers.Serializer):
    tenant_id = serializers.CharField()
    allowed = serializers.BooleanField()
    remaining = serializers.CharField(allow_null=True, help_text="The tightest hard quota's room; null: unlimited.")
    reset_at = serializers.DateTimeField(allow_null=True)
    quotas = EntitlementQuotaSerializer(many=True)


class InheritedSerializer(serializers.Serializer):
    allowed = serializers.BooleanField(help_text="`quantity` fits at every level above the key's own tenant.")


class EntitlementSerializer(serializers.Serializer):
    tenant_id = serializers.CharField()
    feature = serializers.CharField()
    quantity = serializers.CharField()
    allowed = serializers.BooleanField(help_text="`quantity` fits at every level of the lineage.")
    exempt = serializers.BooleanField(help_text="Zero-cap: recorded, never blocked.")
    remaining = serializers.CharField(
        allow_null=True, help_text="The tightest hard quota's room over the listed `levels`; null: unlimited there."
    )
    reset_at = serializers.DateTimeField(allow_null=True, help_text="When that tightest listed quota resets.")
    levels = EntitlementLevelSerializer(many=True, help_text="From the key's own tenant down to `tenant_id`.")
    inherited = InheritedSerializer(
        allow_null=True,
        help_text="The levels above the key's own tenant, as one bit: whether `quantity` fits there. Never their "
        "tenant ids, limits, usage, room or reset times; null when the key's tenant is a root.",
    )


ENTITLEMENTS_DOC = """Would `quantity` of `feature` fit at every level of the tenant's lineage? Consumes nothing.

Levels from the API key's own tenant down to `tenant_id` are listed with each quota (limit, used, remaining,
reset); the top-level `remaining` and `reset_at` are those of the tightest listed quota. Levels *above* the key's
tenant belong to someone else: they decide `allowed` as much as any level, but contribute only that one bit
(`inherited.allowed`), never their tenant id, limit, usage, room or reset time. Asked for many quantities, that
bit still tells the room left above (a binary search): `API_RATE` bounds how often."""


def _status_at(rule: Any, moment: datetime) -> QuotaStatus:
    start, end = rule.window(moment)
    units = rollups.sum_units(rule.level.pk, rule.feature, start, end, using=metering_settings.DATABASE_ALIAS)
    units += reserved_units(rule.level_path, rule.feature, start, end, metering_settings.DATABASE_ALIAS)
    used = units_to_quantity(units)
    return QuotaStatus(
        tenant_id=rule.level.tenant_id,
        feature=rule.feature,
        period=rule.period,
        limit=rule.limit,
        used=used,
        hard=rule.hard,
        reset_at=end,
        window_start=start,
        quota_id=rule.quota_id,
        thresholds=rule.thresholds,
        used_before=used,
    )


def _fits(status: QuotaStatus, quantity: Decimal) -> bool:
    return not status.hard or status.used + quantity <= status.limit


def _tightest(statuses: list[QuotaStatus]) -> QuotaStatus | None:
    return min((status for status in statuses if status.hard), key=lambda status: status.remaining, default=None)


def _amount(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


class EntitlementsView(ApiView):
    @extend_schema(
        operation_id="entitlements_retrieve",
        summary="Would a quantity fit? Per lineage level, consuming nothing",
        description=ENTITLEMENTS_DOC,
        parameters=[EntitlementQuerySerializer, RETRY_AFTER],
        responses={200: EntitlementSerializer, **error_responses()},
        tags=["entitlements"],
    )
    def get(self, request: Request) -> Response:
        params = query_params(request, EntitlementQuerySerializer)
        tenant = tenant_in_scope(self.principal, params.get("tenant_id"))
        feature: str = params["feature"]
        quantity: Decimal = params.get("quantity", Decimal(1))
        context = get_context(tenant.external_id, require_active=False)
        if not context.is_active:
            raise ApiError(403, "inactive_tenant", f"tenant {tenant.external_id!r} or an ancestor is deactivated")
        decision = QuotaPolicyHandler(context).check(feature, quantity)
        if decision.allowed:
            statuses = list(decision.statuses)
        else:
            # A refused check carries only the blocking quota: read every level's standing from the database.
            now = utcnow()
            statuses = [_status_at(rule, now) for rule in rules_for(context, feature)]

        own_index = next((i for i, level in enumerate(context.lineage) if level.pk == self.principal.tenant.pk), None)
        if own_index is None:  # the tree moved between the scope check and the (cached) lineage read
            raise unknown_tenant(tenant.external_id)
        seen = context.seen_from(self.principal.tenant.pk)
        levels = []
        visible: list[QuotaStatus] = []
        for level in seen.visible_levels:
            here = [status for status in statuses if status.tenant_id == level.tenant_id]
            visible += here
            tightest = _tightest(here)
            levels.append(
                {
                    "tenant_id": level.tenant_id,
                    "allowed": all(_fits(status, quantity) for status in here),
                    "remaining": _amount(tightest.remaining if tightest else None),
                    "reset_at": iso(tightest.reset_at if tightest else None),
                    "quotas": [
                        {
                            "id": status.quota_id,
                            "period": status.period,
                            "enforcement": "hard" if status.hard else "soft",
                            "limit": _amount(status.limit),
                            "used": _amount(status.used),
                            "remaining": _amount(status.remaining),
                            "reset_at": iso(status.reset_at),
                            "allowed": _fits(status, quantity),
                        }
                        for status in here
                    ],
                }
            )
        inherited = None
        if seen.visible_from > 0:
            # One bit, and only for the quantity asked: room, usage or a reset time would move (or tell) when
            # another tenant under those levels spends.
            shown = {level.tenant_id for level in seen.visible_levels}
            above = [status for status in statuses if status.tenant_id not in shown]
            inherited = {"allowed": all(_fits(status, quantity) for status in above)}
        overall = _tightest(visible)
        return Response(
            {
                "tenant_id": tenant.external_id,
                "feature": feature,
                "quantity": _amount(quantity),
                "allowed": decision.allowed,
                "exempt": context.exempt,
                "remaining": _amount(overall.remaining if overall else None),
                "reset_at": iso(overall.reset_at if overall else None),
                "levels": levels,
                "inherited": inherited,
            }
        )
