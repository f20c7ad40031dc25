"""The OpenAPI 3 schema at /api/schema/, the local Swagger UI at /api/docs/, and JSON errors everywhere under /api/."""

from __future__ import annotations

import re

import pytest
from django.contrib.staticfiles import finders
from django.test import Client
from drf_spectacular.validation import validate_schema

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
    validate_schema(schema)  # raises on an invalid document


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


@pytest.mark.parametrize("path", ["/api/v1/nothing", "/api/v1/events/", "/api/v1/quotas/1/extra", "/api/v1/"])
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
