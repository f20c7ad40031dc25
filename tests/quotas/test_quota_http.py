"""Enforcement points: decorator (sync, async, class-based, DRF), DRF permission, middleware; 429 and headers."""

from __future__ import annotations

import json
import re

import pytest
from django.test import AsyncClient, Client

from metering.models import UsageRecord
from tests.factories import tree, usage
from tests.identity_helpers import bearer, key_of
from tests.quota_helpers import limit as set_limit

pytestmark = pytest.mark.django_db(transaction=True)

ORG = {"org": None, "p1": "org", "k1": "p1", "k2": "p1"}


def limit(tenant_id: str, amount: int, feature: str = "api_calls"):
    return set_limit(tenant_id, amount, feature=feature)


ROUTES = [
    {"url_name": "routed-by-name", "feature": "api_calls"},
    {"path_prefix": "/metered/", "feature": "api_calls", "quantity": 3},
]


_org_key: dict[str, str] = {}


@pytest.fixture(autouse=True)
def urls(settings):
    settings.ROOT_URLCONF = "tests.quota_urls"
    settings.METERING = {"QUOTA_ROUTES": ROUTES}
    tree(ORG)
    _org_key["key"] = key_of("org")  # sees every level: these tests read the details of each (test_leaks hides them)


def acting(tenant: str) -> dict[str, str]:
    """The organization's API key narrowed to ``tenant`` (identity: tests/tenants/test_identity.py)."""
    return bearer(_org_key["key"], **{"X-Tenant-ID": tenant})


def get(path: str, tenant: str | None = "k1", client: Client | None = None, **kwargs):
    headers = acting(tenant) if tenant else {}
    return (client or Client()).get(path, headers=headers, **kwargs)


def assert_429(response, tenant: str, limit_value: str) -> dict:
    assert response.status_code == 429
    body = response.json()["error"]
    assert body["code"] == "quota_exceeded"
    assert body["tenant"] == tenant and body["feature"] == "api_calls" and body["limit"] == limit_value
    assert {"used", "requested", "reset", "period"} <= set(body)
    assert int(response["Retry-After"]) > 0
    assert re.fullmatch(rf'"{tenant}/api_calls/month";q=\d+', response["RateLimit-Policy"])
    assert re.fullmatch(rf'"{tenant}/api_calls/month";r=0;t=\d+', response["RateLimit"])
    return body


@pytest.mark.parametrize("path", ["/sync", "/class", "/drf-decorated", "/drf-permission", "/routed/by-name"])
def test_each_enforcement_point_counts_and_blocks_at_the_limit(path):
    limit("p1", 3)
    for remaining in (2, 1, 0):
        response = get(path)
        assert response.status_code == 200, response.content
        assert response["RateLimit"].startswith(f'"p1/api_calls/month";r={remaining};t=')
        assert response["RateLimit-Policy"].startswith('"p1/api_calls/month";q=3;w=')
    assert_429(get(path, tenant="k2"), "p1", "3")
    assert usage("p1", "api_calls") == 3
    assert UsageRecord.objects.count() == 3


def test_async_views_are_enforced_without_blocking_the_event_loop():
    from asgiref.sync import async_to_sync

    limit("org", 4)

    async def call():
        return await AsyncClient().get("/async", headers=acting("k1"))

    assert async_to_sync(call)().status_code == 200
    assert async_to_sync(call)().status_code == 200
    assert_429(async_to_sync(call)(), "org", "4")
    assert usage("org", "api_calls") == 4


def test_quantity_can_be_computed_from_the_request():
    limit("org", 5, feature="items")
    body = json.dumps({"items": [1, 2, 3]})
    assert Client().post("/batch", body, content_type="application/json", headers=acting("k1")).status_code == 200
    refused = Client().post("/batch", body, content_type="application/json", headers=acting("k1"))
    assert refused.status_code == 429 and refused.json()["error"]["requested"] == "3"
    assert usage("org", "items") == 3


def test_middleware_path_prefix_route_with_quantity_and_unrouted_paths_are_free():
    limit("org", 7)
    assert get("/metered/anything").status_code == 200
    assert get("/metered/anything").status_code == 200
    assert get("/metered/anything").status_code == 429
    assert get("/free").status_code == 200  # not routed: never metered
    assert usage("org", "api_calls") == 6


def test_a_view_raising_quota_exceeded_is_answered_429_by_the_middleware():
    limit("k1", 4)
    assert_429(get("/raising"), "k1", "4")


def test_requests_without_a_tenant_are_refused_with_a_json_error():
    response = get("/sync", tenant=None)
    assert response.status_code == 401 and response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert response.json()["error"]["code"] == "not_authenticated"
    assert response.json()["error"]["field"] == "Authorization"


def test_a_bad_quantity_is_a_400_naming_the_field(settings):
    settings.METERING = {
        "QUOTA_ROUTES": [{"path_prefix": "/free", "feature": "api_calls", "quantity": -1}],
    }
    response = get("/free")
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "quantity"


@pytest.mark.parametrize("path", ["/demo/completions", "/demo/completions-async"])
def test_demo_endpoint_answers_429_when_any_level_is_out_of_room(settings, path):
    settings.ROOT_URLCONF = "project.urls"
    limit("org", 5, feature="llm_tokens")
    body = {"prompt": "one two three"}
    ok = Client().post(path, body, content_type="application/json", headers=acting("k1"))
    assert ok.status_code == 200 and ok["RateLimit"].startswith('"org/llm_tokens/month";r=2')
    refused = Client().post(path, body, content_type="application/json", headers=acting("k2"))
    assert refused.status_code == 429
    assert refused.json()["error"]["tenant"] == "org"
    assert usage("org", "llm_tokens") == 3
