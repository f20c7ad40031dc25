"""OpenAPI pieces (drf-spectacular): the Bearer API-key scheme and the shared error body."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiResponse
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


ERROR_RESPONSES: dict[int, OpenApiResponse] = {
    400: OpenApiResponse(ErrorSerializer, description="Bad input; `field` names the culprit."),
    401: OpenApiResponse(ErrorSerializer, description="No API key, or a malformed, unknown, revoked or expired one."),
    403: OpenApiResponse(ErrorSerializer, description="Not allowed (e.g. the key's tenant is deactivated)."),
    404: OpenApiResponse(ErrorSerializer, description="Unknown tenant or object — or one outside the key's subtree."),
}
