"""What every API view shares: API-key authentication, JSON only, the error shape, pagination, tenant scoping.

Scoping: a key acts for its tenant's subtree. A tenant outside it is answered exactly as one that does not exist
(``unknown_tenant``, 404), so a caller learns nothing about other trees.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import exceptions, serializers
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import BaseParser
from rest_framework.permissions import BasePermission
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.views import APIView

from metering.conf import metering_settings
from metering.events import FEATURE_NAME_RE, JsonNumber, quantity_to_units, units_to_quantity, validate_feature_name
from metering.exceptions import InvalidFeatureName, InvalidQuantity
from tenants.authentication import ApiKeyAuthentication, TenantPrincipal
from tenants.exceptions import InvalidTenantId
from tenants.lineage import validate_tenant_id
from tenants.models import TENANT_ID_PATTERN, Tenant

from .errors import ApiError, exception_handler, unknown_tenant
from .throttling import ApiKeyRateThrottle

MAX_JSON_DEPTH = 64
"""Nesting levels a JSON body may have (an event batch with metadata needs far fewer); deeper is 400."""

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers more than ``limit`` levels deep (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def loads_json(raw: bytes, *, limit: int) -> Any:
    """A JSON body as Python, judged strictly. Raises ``ApiError`` naming ``body``.

    At most ``limit`` bytes (413), UTF-8 (RFC 8259), no ``NaN``/``Infinity``, at most ``MAX_JSON_DEPTH`` levels.
    Numbers with a fraction or exponent become ``JsonNumber`` so a quantity is judged as written, not as the float
    it rounds to. Lone surrogate escapes (``"\\ud800"``) parse; the field validators refuse them by name.
    """
    if len(raw) > limit:
        raise ApiError(413, "payload_too_large", f"the body must be at most {limit} bytes", "body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(
            400, "invalid_json", f"the body is not UTF-8: {error.reason} at byte {error.start}", "body"
        ) from None
    try:
        value = json.loads(text, parse_float=JsonNumber, parse_constant=_reject_constant)
    except RecursionError:
        value = None
        too_deep = True
    except ValueError as error:  # JSONDecodeError, a rejected constant, an integer of more than 4,300 digits
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {error}", "body") from None
    else:
        too_deep = isinstance(value, dict | list) and _too_deep(value, MAX_JSON_DEPTH)
    if too_deep:
        raise ApiError(400, "invalid_json", f"the body nests deeper than {MAX_JSON_DEPTH} levels", "body")
    return value


def length_required(meta: dict[str, Any], method: str | None) -> ApiError | None:
    """411 for a body sent chunked without ``Content-Length``: WSGI would read it as empty, silently."""
    if method not in BODY_METHODS or meta.get("CONTENT_LENGTH"):
        return None
    if "chunked" in str(meta.get("HTTP_TRANSFER_ENCODING", "")).lower():
        return ApiError(
            411,
            "length_required",
            "send the body with a Content-Length (chunked bodies are not read)",
            "Content-Length",
        )
    return None


class BoundedJSONParser(BaseParser):
    """The API's JSON parser (``loads_json``), bounded by the view's ``max_body_bytes()`` — by default Django's
    ``DATA_UPLOAD_MAX_MEMORY_SIZE``; the events endpoint allows a full batch."""

    media_type = "application/json"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        view = (parser_context or {}).get("view")
        bound = getattr(view, "max_body_bytes", None)
        limit = int(bound()) if callable(bound) else default_max_body_bytes()
        raw = stream.read(limit + 1) if stream is not None else b""
        return loads_json(raw, limit=limit)


def default_max_body_bytes() -> int:
    return int(settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 2_621_440)


class AsciiJSONRenderer(JSONRenderer):
    """JSON with every non-ASCII character escaped: an error naming a field that holds a lone surrogate (which
    UTF-8 cannot encode) is still a valid answer, never a ``UnicodeEncodeError``."""

    ensure_ascii = True


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
    renderer_classes = [AsciiJSONRenderer]
    parser_classes = [BoundedJSONParser]
    # METERING["API_RATE"] per API key (None: off); read per request, so override_settings applies.
    throttle_classes = [ApiKeyRateThrottle]

    def get_exception_handler(self) -> Callable[[Exception, dict[str, Any]], Any]:
        return exception_handler

    def max_body_bytes(self) -> int:
        """The largest body this view reads (``BoundedJSONParser``); larger is 413."""
        return default_max_body_bytes()

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # Before authentication: a body the server cannot read is refused whoever sends it.
        refused = length_required(request.META, request.method)
        if refused is not None:
            raise refused
        length = str(request.META.get("CONTENT_LENGTH") or "")
        if request.method in BODY_METHODS and length and length != "0" and not request.content_type:
            raise exceptions.UnsupportedMediaType("", detail="send the body as Content-Type: application/json")
        super().initial(request, *args, **kwargs)

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
    try:
        tenant_id = validate_tenant_id(tenant_id)
    except InvalidTenantId as error:
        raise ApiError(400, error.code, str(error), field) from None
    # The subtree is part of the query: a tenant of another tree is not even read, so it costs what no tenant costs.
    tenant = Tenant.objects.filter(external_id=tenant_id, path__startswith=principal.tenant.path).first()
    if tenant is None or not principal.sees(tenant):
        raise unknown_tenant(tenant_id, field)
    return tenant


# ---- fields ----

# The quantity grammar the server accepts, as JSON Schema states it (``metering.events``: ASCII digits, at most 6
# decimals, at most MAX_QUANTITY). The number form's 6-decimal rule cannot be stated exactly in JSON Schema.
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]{1,6})?$"
MAX_QUANTITY_DECLARED = int(Decimal(metering_settings.MAX_QUANTITY))
QUANTITY_MAX_LENGTH = len(str(MAX_QUANTITY_DECLARED)) + 7


def check_quantity_length(value: Any) -> Any:
    """Refuse a quantity string longer than the schema's ``maxLength`` (only leading zeros could make a valid one
    longer); ``InvalidQuantity`` otherwise returns ``value`` unchanged for ``quantity_to_units``."""
    if isinstance(value, str) and len(value) > QUANTITY_MAX_LENGTH:
        raise InvalidQuantity(f"quantity must be at most {QUANTITY_MAX_LENGTH} characters, got {len(value)}")
    return value


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "pattern": QUANTITY_PATTERN, "maxLength": QUANTITY_MAX_LENGTH},
            {"type": "number", "minimum": 0, "maximum": MAX_QUANTITY_DECLARED},
        ],
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
            return units_to_quantity(quantity_to_units(check_quantity_length(data)))
        except InvalidQuantity as error:
            raise serializers.ValidationError(
                str(error).replace("quantity", self.field_name or "quantity", 1), code=self.code
            ) from None

    def to_representation(self, value: Any) -> str:
        return format(units_to_quantity(quantity_to_units(Decimal(value))), "f")


_SPACE_FOR_PLUS = re.compile(r"([Tt][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?) ([0-9]{2}:?[0-9]{2})\Z")


MAX_UNIX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z


def parse_moment(value: object, *, allow_epoch: bool = False, from_query: bool = False) -> datetime:
    """An aware UTC datetime from ISO-8601 with an offset (or ``Z``) — or Unix seconds when ``allow_epoch``.

    Raises ``ValueError`` with a message for the client: also for a moment outside years 1-9999 once in UTC, and
    for text with surrounding whitespace or non-ASCII characters. RFC 3339's lower-case ``t`` and ``z`` are read
    as ``T`` and ``Z``. In a query string an unencoded ``+`` arrives as a space; ``from_query`` puts it back.
    """
    if allow_epoch and isinstance(value, int | float) and not isinstance(value, bool):
        # An int is compared before any float is made of it: 10**309 has no float (OverflowError).
        if isinstance(value, int) and abs(value) > MAX_UNIX_SECONDS:
            raise ValueError(f"Unix seconds must be at most {MAX_UNIX_SECONDS} in magnitude")
        if not math.isfinite(value):
            raise ValueError("Unix seconds must be finite")
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"{value!r} is out of range for Unix seconds") from None
    if not isinstance(value, str):
        expected = "an ISO-8601 string or Unix seconds" if allow_epoch else "an ISO-8601 string"
        raise ValueError(f"expected {expected}, got {type(value).__name__}")
    text = value
    if from_query:
        text = _SPACE_FOR_PLUS.sub(r"\1+\2", text)
    if not text.isascii() or not text.isprintable() or text != text.strip() or len(text) > 64:
        raise ValueError(f"{value!r} is not an ISO-8601 date and time")
    try:
        moment = datetime.fromisoformat(text.upper())
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO-8601 date and time") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{value!r} has no UTC offset: add Z or +HH:MM (naive times are ambiguous)")
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value!r} is outside years 1-9999 once converted to UTC") from None


@extend_schema_field({"type": "string", "format": "date-time", "maxLength": 64, "example": "2025-01-31T12:00:00Z"})
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


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def query_params(request: Request, serializer_class: type[serializers.Serializer]) -> dict[str, Any]:
    """Validated query parameters. Refused (400, naming the parameter): unknown ones (a misspelt filter), repeated
    ones (``?feature=a&feature=b`` has no one meaning) and values holding control characters or surrogates."""
    known = set(serializer_class().fields)
    reject_unknown({key: None for key in request.query_params}, known)
    data: dict[str, Any] = {}
    for key, values in request.query_params.lists():
        if len(values) > 1:
            raise ApiError(400, "repeated_parameter", f"give {key!r} once, not {len(values)} times", key)
        if _UNPRINTABLE.search(values[0]):
            raise ApiError(400, "invalid_characters", f"{key} holds a control character or a lone surrogate", key)
        data[key] = values[0]
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


class QueryIntegerField(serializers.IntegerField):
    """A query-string integer of ASCII digits only (DRF's ``int()`` would take ``"١٢"``, ``"1_0"``, ``" 2 "``)."""

    def to_internal_value(self, data: Any) -> int:
        if not isinstance(data, str) or not re.fullmatch(r"[0-9]{1,18}", data):
            self.fail("invalid")
        return int(super().to_internal_value(data))


def _anchored(pattern: re.Pattern[str]) -> str:
    """A server regex (matched whole, with ``fullmatch``) as a JSON Schema pattern, which matches anywhere."""
    return "^" + pattern.pattern.removeprefix("^").removesuffix("$") + "$"


FEATURE_PATTERN = _anchored(FEATURE_NAME_RE)
TENANT_ID_SCHEMA_PATTERN = _anchored(re.compile(TENANT_ID_PATTERN))


@extend_schema_field(
    {
        "type": "string",
        "minLength": 1,
        "maxLength": metering_settings.MAX_FEATURE_NAME_LENGTH,
        "pattern": FEATURE_PATTERN,
    }
)
class FeatureField(StrictCharField):
    """A feature name: letters, digits and ``_ . : -`` (``metering.events.validate_feature_name``), as sent (no
    whitespace trimmed: ``" llm_tokens"`` is not ``llm_tokens``)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", metering_settings.MAX_FEATURE_NAME_LENGTH)
        kwargs.setdefault("trim_whitespace", False)
        kwargs.setdefault("help_text", "Letters, digits and _ . : - (starting with a letter, digit or _).")
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        value = super().to_internal_value(data)
        try:
            return validate_feature_name(value)
        except InvalidFeatureName as error:
            raise serializers.ValidationError(str(error), code=error.code) from None


@extend_schema_field({"type": "string", "minLength": 1, "maxLength": 128, "pattern": TENANT_ID_SCHEMA_PATTERN})
class TenantIdField(StrictCharField):
    """A tenant id as sent (``tenants.lineage.validate_tenant_id`` judges it; no whitespace trimmed)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 128)
        kwargs.setdefault("trim_whitespace", False)
        kwargs.setdefault("help_text", "Default: the API key's tenant. Must be in the key's subtree.")
        super().__init__(**kwargs)
