"""The OpenAPI 3 schema at /api/schema/, the local Swagger UI at /api/docs/, and JSON errors everywhere under /api/."""

from __future__ import annotations

import re

import pytest
from django.contrib.staticfiles import finders
from django.test import Client
from drf_spectacular.validation import validate_schema
from openapi_spec_validator import validate

from metering.api.base import FEATURE_PATTERN
from metering.api.base import TENANT_ID_SCHEMA_PATTERN as TENANT_ID_PATTERN
from tests.api_helpers import error_of

pytest_plugins = ["tests.api_fixtures"]

PATHS = {
    "/api/v1/events": {"post"},
    "/api/v1/usage": {"get"},
    "/api/v1/entitlements": {"get"},
    "/api/v1/quotas": {"get", "post"},
    "/api/v1/quotas/{id}": {"get", "put", "patch", "delete"},
}


@pytest.fixture
def schema(db):
    response = Client().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/vnd.oai.openapi+json")
    return response.json()


def test_the_schema_is_valid_openapi_3(schema):
    assert schema["openapi"].startswith("3.")
    validate_schema(schema)  # drf-spectacular's own check: raises on an invalid document
    validate(schema)  # openapi-spec-validator: the reference validator (it caught a stray path parameter once)


def test_the_id_path_parameter_is_on_the_detail_routes_only(schema):
    for path, methods in PATHS.items():
        for method in methods:
            names = [(p["name"], p["in"]) for p in schema["paths"][path][method].get("parameters", [])]
            if "{id}" in path:
                assert ("id", "path") in names, (path, method)
                (param,) = [p for p in schema["paths"][path][method]["parameters"] if p["name"] == "id"]
                assert param["schema"] == {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
            else:
                assert not [name for name, where in names if where == "path"], (path, method, names)


def _component(schema, name):
    return schema["components"]["schemas"][name]


def test_quantities_are_declared_as_the_server_judges_them(schema):
    assert _component(schema, "EventRequest")["properties"]["quantity"]["oneOf"] == [
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]{1,6})?$", "maxLength": 20},
        {"type": "number", "minimum": 0, "maximum": 10**12},
    ]
    # A limit bounds a window's total, not one fact: up to what the limit column holds.
    for component in ("QuotaRequest", "PatchedQuotaUpdateRequest"):
        assert _component(schema, component)["properties"]["limit"]["oneOf"] == [
            {"type": "string", "pattern": r"^[0-9]+(\.[0-9]{1,6})?$", "maxLength": 25},
            {"type": "number", "minimum": 0, "maximum": 10**18, "exclusiveMaximum": True},
        ]
    (quantity,) = [p for p in schema["paths"]["/api/v1/entitlements"]["get"]["parameters"] if p["name"] == "quantity"]
    # A query string has no JSON numbers: the string form only.
    assert quantity["schema"] == {
        "type": "string",
        "pattern": r"^[0-9]+(\.[0-9]{1,6})?$",
        "maxLength": 20,
        "example": "12.5",
    }


def test_every_string_is_bounded_and_patterned_as_the_server_checks_it(schema):
    event = _component(schema, "EventRequest")["properties"]
    assert event["tenant_id"]["maxLength"] == 128 and event["tenant_id"]["pattern"] == TENANT_ID_PATTERN
    assert event["feature_name"] == {**event["feature_name"], "maxLength": 100, "pattern": FEATURE_PATTERN}
    assert event["transaction_id"]["maxLength"] == 128
    assert event["transaction_id"]["pattern"] == "^[\\u0021-\\u007e]{1,128}$"
    assert event["metadata"]["nullable"] is True  # null is accepted as "no metadata" (test_api_hostile)
    # null is "now" (found by schemathesis: the server took null while the schema refused it)
    assert event["timestamp"]["oneOf"][0] == {
        "type": "string",
        "format": "date-time",
        "maxLength": 64,
        "nullable": True,
    }
    quota = _component(schema, "QuotaRequest")["properties"]
    assert quota["tenant_id"]["pattern"] == TENANT_ID_PATTERN and quota["feature"]["pattern"] == FEATURE_PATTERN
    for path, methods in PATHS.items():
        for method in methods:
            for param in schema["paths"][path][method].get("parameters", []):
                declared = param["schema"]
                if declared.get("type") == "string" and "enum" not in declared:
                    assert "maxLength" in declared, (path, method, param["name"])


def test_request_bodies_refuse_unknown_fields(schema):
    for name in [
        "EventRequest",
        "EventBatchRequest",
        "QuotaRequest",
        "QuotaUpdateRequest",
        "PatchedQuotaUpdateRequest",
    ]:
        assert _component(schema, name)["additionalProperties"] is False, name
    assert _component(schema, "EventBatchRequest")["properties"]["events"]["maxItems"] == 1000


EXPECTED_ERRORS = {
    ("/api/v1/events", "post"): {400, 401, 403, 404, 406, 411, 413, 415, 422, 503},
    ("/api/v1/usage", "get"): {400, 401, 403, 404, 406, 503},
    ("/api/v1/entitlements", "get"): {400, 401, 403, 404, 406, 503},
    ("/api/v1/quotas", "get"): {400, 401, 403, 404, 406, 503},
    ("/api/v1/quotas", "post"): {400, 401, 403, 404, 406, 409, 411, 413, 415, 503},
    ("/api/v1/quotas/{id}", "get"): {400, 401, 403, 404, 406, 503},
    ("/api/v1/quotas/{id}", "put"): {400, 401, 403, 404, 406, 411, 413, 415, 503},
    ("/api/v1/quotas/{id}", "patch"): {400, 401, 403, 404, 406, 411, 413, 415, 503},
    ("/api/v1/quotas/{id}", "delete"): {400, 401, 403, 404, 406, 503},
}


def test_every_error_status_a_route_can_answer_is_declared_with_the_error_body(schema):
    for (path, method), expected in EXPECTED_ERRORS.items():
        responses = schema["paths"][path][method]["responses"]
        errors = {int(code) for code in responses if int(code) >= 400}
        assert errors == expected, (path, method, errors)
        for code in errors:
            body = responses[str(code)]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/Error"}, (path, method, code)
        assert responses["503"]["headers"]["Retry-After"]["schema"] == {"type": "integer"}


def test_the_schema_has_every_endpoint_and_method(schema):
    assert {path: set(schema["paths"][path]) - {"parameters"} for path in PATHS} == PATHS
    assert not [path for path in schema["paths"] if not path.startswith("/api/v1/")]


def test_every_operation_needs_the_bearer_key_and_documents_errors(schema):
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "xk_<prefix>_<secret>",
        "description": schema["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    for path, methods in PATHS.items():
        for method in methods:
            operation = schema["paths"][path][method]
            assert operation["security"] == [{"ApiKey": []}], (path, method)
            assert {"401", "404"} <= set(operation["responses"]), (path, method)


def test_the_schema_describes_bodies_and_parameters(schema):
    events = schema["paths"]["/api/v1/events"]["post"]
    assert "422" in events["responses"]
    request_schema = events["requestBody"]["content"]["application/json"]["schema"]
    assert request_schema == {"$ref": "#/components/schemas/EventOrBatchRequest"}
    usage_params = {param["name"] for param in schema["paths"]["/api/v1/usage"]["get"]["parameters"]}
    assert usage_params == {"tenant_id", "feature", "period", "at", "start", "end"}
    entitlement = schema["components"]["schemas"]["Entitlement"]["properties"]
    assert {"allowed", "levels", "inherited", "remaining", "reset_at"} <= set(entitlement)


def test_the_yaml_schema_too(db):
    response = Client().get("/api/schema/")
    assert response.status_code == 200 and b"openapi: 3." in response.content


def test_swagger_ui_is_served_without_a_cdn(db):
    response = Client().get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger-ui" in html and "/api/schema/" in html
    # Only addresses count: the page also carries a random CSRF token, which may spell "cdn" by chance.
    assert not re.search(r"""(?:https?:)?//[^"'\s]*(?:cdn|jsdelivr|unpkg|cloudflare)""", html, re.IGNORECASE)
    assets = re.findall(r"""(?:src|href)=["']/static/([^"']+)["']""", html)
    assert assets, html
    for asset in assets:
        assert finders.find(asset), asset


# ---- JSON errors, never HTML, anywhere under /api/ ----


@pytest.mark.parametrize(
    "path", ["/api/v1/nothing", "/api/v1/events/", "/api/v1/quotas/1/extra", "/api/v1/", "/api/x", "/api"]
)
def test_unknown_api_paths_are_json_404(api, path):
    response = api.get(path)
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


def test_an_unacceptable_accept_header_is_json_406(api):
    response = api.client.get("/api/v1/quotas", headers={**api.headers("project"), "Accept": "text/csv"})
    assert response.status_code == 406
    assert error_of(response)["code"] == "not_acceptable"


def test_a_browser_accept_header_still_gets_json(api):
    headers = {**api.headers("project"), "Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    response = api.client.get("/api/v1/quotas", headers=headers)
    assert response.status_code == 200 and response.json()["count"] == 0
