"""OpenAPI pieces (drf-spectacular): the Bearer API-key scheme, closed request bodies and the error answers.

The served schema is meant to be *true*: what it declares valid, the server judges by the same rules, and every
status a route can answer is declared (``tests/integration/test_api_schema.py`` validates it,
``tests/integration/test_api_schemathesis.py`` checks the server against it).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerExtension
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "tenants.authentication.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "xk_<prefix>_<secret>",
            "description": "An API key of a tenant (manage.py apikey create TENANT_ID, or the admin). "
            "It acts for that tenant's subtree only.",
        }


# A request body whose unknown fields the server refuses (400 ``unknown_field``): the schema says so with
# ``additionalProperties: false``. (A comment, not a docstring: drf-spectacular would make it every subclass's
# description.)
class ClosedSerializer(serializers.Serializer):
    pass


class ClosedSerializerScheme(OpenApiSerializerExtension):
    target_class = ClosedSerializer
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        schema: dict[str, Any] = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        if direction == "request":
            schema["additionalProperties"] = False
        return schema


class ErrorBodySerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Stable, machine-readable: unknown_tenant, invalid_quantity, ...")
    field = serializers.CharField(allow_null=True, help_text="The offending field, parameter or header, or null.")
    message = serializers.CharField(help_text="For humans; may change.")
    details = serializers.JSONField(
        required=False,
        help_text="400: every field's messages. 422 (events): error codes per event index and field.",
    )
    messages = serializers.JSONField(required=False, help_text="422 (events): messages per event index and field.")


class ErrorSerializer(serializers.Serializer):
    error = ErrorBodySerializer()


_DESCRIPTIONS = {
    400: "Bad input; `field` names the culprit (a body field, query parameter or `body` for unparsable JSON).",
    401: "No API key, or a malformed, unknown, revoked or expired one.",
    403: "Not allowed (e.g. the key's tenant is deactivated).",
    404: "Unknown tenant or object — or one outside the key's subtree.",
    406: "The Accept header admits no JSON.",
    409: "That tenant already has a quota on this feature and period.",
    411: "A chunked body without Content-Length (it would read as empty).",
    413: "The body is larger than this endpoint reads.",
    415: "A body that is not Content-Type: application/json.",
    422: "Some events are invalid; nothing was stored.",
    503: "A store (database or Redis) is unavailable; retry after `Retry-After` seconds.",
}

READ_STATUSES = (400, 401, 403, 404, 406, 503)
"""What any API route may answer besides success: every request is authenticated, negotiated and scoped."""

BODY_STATUSES = (411, 413, 415)
"""What a route that reads a JSON body may answer besides ``READ_STATUSES``."""


def error_responses(*statuses: int, **descriptions: str) -> dict[int, OpenApiResponse]:
    """The documented error answers of a route: ``READ_STATUSES`` plus ``statuses``; ``descriptions`` (keyed
    ``s403=...``) overrides the text of a status."""
    answers: dict[int, OpenApiResponse] = {}
    for code in sorted({*READ_STATUSES, *statuses}):
        text = descriptions.get(f"s{code}", _DESCRIPTIONS[code])
        answers[code] = OpenApiResponse(ErrorSerializer, description=text)
    return answers


RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    int,
    OpenApiParameter.HEADER,
    response=[503],
    required=False,
    description="Seconds to wait before retrying (sent when a store is temporarily unavailable).",
)
"""The 503 answer's header, declared on every operation (``extend_schema(parameters=[RETRY_AFTER])``)."""


ERROR_RESPONSES: dict[int, OpenApiResponse] = error_responses()
"""The answers every route may give (kept for callers of the former constant)."""
