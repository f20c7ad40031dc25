"""What every API view shares: API-key authentication, JSON only, the error shape, pagination, tenant scoping.

Scoping: a key acts for its tenant's subtree. A tenant outside it is answered exactly as one that does not exist
(``unknown_tenant``, 404), so a caller learns nothing about other trees.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import exceptions, serializers
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import JSONParser
from rest_framework.permissions import BasePermission
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.views import APIView

from metering.events import quantity_to_units, units_to_quantity, validate_feature_name
from metering.exceptions import InvalidFeatureName, InvalidQuantity
from tenants.authentication import ApiKeyAuthentication, TenantPrincipal
from tenants.models import Tenant

from .errors import ApiError, exception_handler, unknown_tenant


class IsTenantPrincipal(BasePermission):
    """The caller authenticated with an API key (any other kind of user has no tenant to act for)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        if not isinstance(request.user, TenantPrincipal):
            raise exceptions.NotAuthenticated("send an API key: 'Authorization: Bearer xk_<prefix>_<secret>'")
        return True


class ApiView(APIView):
    """Settings every API view carries itself, so a host project's ``REST_FRAMEWORK`` defaults cannot change them."""

    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [IsTenantPrincipal]
    renderer_classes = [JSONRenderer]
    parser_classes = [JSONParser]

    def get_exception_handler(self) -> Callable[[Exception, dict[str, Any]], Any]:
        return exception_handler

    @property
    def principal(self) -> TenantPrincipal:
        user = self.request.user
        assert isinstance(user, TenantPrincipal)
        return user


class ApiPagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> Any:
        try:
            return super().paginate_queryset(queryset, request, view)
        except exceptions.NotFound:
            raise ApiError(404, "invalid_page", "that page does not exist", "page") from None


def tenant_in_scope(principal: TenantPrincipal, tenant_id: object, field: str = "tenant_id") -> Tenant:
    """The tenant ``tenant_id`` if the caller sees it (its own or below); else ``unknown_tenant`` (404)."""
    if tenant_id is None:
        return principal.tenant
    if not isinstance(tenant_id, str) or not tenant_id or len(tenant_id) > 128:
        raise ApiError(400, "invalid_tenant_id", "tenant_id must be a string of 1 to 128 characters", field)
    tenant = Tenant.objects.filter(external_id=tenant_id).first()
    if tenant is None or not principal.sees(tenant):
        raise unknown_tenant(tenant_id, field)
    return tenant


# ---- fields ----


@extend_schema_field(
    {
        "oneOf": [{"type": "string", "pattern": r"^\d+(\.\d{1,6})?$"}, {"type": "number", "minimum": 0}],
        "description": "A non-negative decimal with at most 6 decimal places; a string keeps it exact.",
        "example": "12.5",
    }
)
class QuantityField(serializers.Field):
    """An exact non-negative quantity: a JSON string or number, at most 6 decimals. Read back as a string."""

    default_error_messages = {"invalid_quantity": "{message}"}

    def __init__(self, *, code: str = "invalid_quantity", **kwargs: Any) -> None:
        self.code = code
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Decimal:
        try:
            return units_to_quantity(quantity_to_units(data))
        except InvalidQuantity as error:
            raise serializers.ValidationError(
                str(error).replace("quantity", self.field_name or "quantity", 1), code=self.code
            ) from None

    def to_representation(self, value: Any) -> str:
        return format(units_to_quantity(quantity_to_units(Decimal(value))), "f")


_SPACE_FOR_PLUS = re.compile(r"(T\d\d:\d\d(?::\d\d(?:\.\d+)?)?) (\d\d:?\d\d)$")


def parse_moment(value: object, *, allow_epoch: bool = False, from_query: bool = False) -> datetime:
    """An aware UTC datetime from ISO-8601 with an offset (or ``Z``) — or Unix seconds when ``allow_epoch``.

    Raises ``ValueError`` with a message for the client. In a query string an unencoded ``+`` arrives as a space;
    ``from_query`` puts it back.
    """
    if allow_epoch and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError("Unix seconds must be finite")
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"{value!r} is out of range for Unix seconds") from None
    if not isinstance(value, str):
        expected = "an ISO-8601 string or Unix seconds" if allow_epoch else "an ISO-8601 string"
        raise ValueError(f"expected {expected}, got {type(value).__name__}")
    text = value.strip()
    if from_query:
        text = _SPACE_FOR_PLUS.sub(r"\1+\2", text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO-8601 date and time") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{value!r} has no UTC offset: add Z or +HH:MM (naive times are ambiguous)")
    return moment.astimezone(UTC)


@extend_schema_field({"type": "string", "format": "date-time", "example": "2025-01-31T12:00:00Z"})
class MomentField(serializers.Field):
    """ISO-8601 with a UTC offset, e.g. ``2025-01-31T12:00:00Z``; naive times are refused."""

    def __init__(self, *, code: str = "invalid_datetime", from_query: bool = True, **kwargs: Any) -> None:
        self.code = code
        self.from_query = from_query
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> datetime:
        try:
            return parse_moment(data, from_query=self.from_query)
        except ValueError as error:
            raise serializers.ValidationError(str(error), code=self.code) from None

    def to_representation(self, value: datetime) -> str | None:
        return iso(value)


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def reject_unknown(data: Any, known: set[str] | frozenset[str]) -> None:
    """Refuse fields the endpoint does not know (a typo must not be silently ignored)."""
    if isinstance(data, dict):
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise ApiError(400, "unknown_field", f"unknown field {unknown[0]!r}", unknown[0])


def query_params(request: Request, serializer_class: type[serializers.Serializer]) -> dict[str, Any]:
    """Validated query parameters; unknown ones (a misspelt filter) are refused."""
    known = set(serializer_class().fields)
    reject_unknown({key: None for key in request.query_params}, known)
    data = {key: request.query_params.get(key) for key in request.query_params}
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


# JSON has types: a number is not a string and 1 is not true (DRF's fields coerce both ways by default).


class StrictCharField(serializers.CharField):
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class StrictBooleanField(serializers.BooleanField):
    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return int(super().to_internal_value(data))


class FeatureField(StrictCharField):
    """A feature name: letters, digits and ``_ . : -`` (``metering.events.validate_feature_name``)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 100)
        kwargs.setdefault("help_text", "Letters, digits and _ . : - (starting with a letter, digit or _).")
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        value = super().to_internal_value(data)
        try:
            return validate_feature_name(value)
        except InvalidFeatureName as error:
            raise serializers.ValidationError(str(error), code=error.code) from None
