"""Information hiding: a caller whose key covers only a key-level tenant learns nothing of the levels above it.

The tree: ``acorp`` (org) -> ``bproj`` (project) -> ``kcall`` (the caller's key-level tenant), with a sibling
``ktwin`` under the project and a second project ``bside`` -> ``kside`` under the org, both of which spend. Quotas
at every level; the ancestors' figures are distinctive 8-digit numbers, so a search of every response (status line,
headers, body) for them (and for the ancestors' ids and their period, ``month``; the caller's own quotas are
daily) is meaningful. Every enforcement point is driven allowed and refused, and every REST endpoint and error.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.http import HttpRequest
from django.test import AsyncClient, Client
from django.urls import include, path
from rest_framework.request import Request
from rest_framework.response import Response

from metering.api.base import ApiView
from quotas.exceptions import QuotaExceeded
from quotas.handler import QuotaPolicyHandler
from quotas.http import quota_exceeded_response
from quotas.models import QuotaLimit
from tenants.apikeys import create_api_key, key_for_request
from tenants.context import TenantContext
from tenants.lineage import get_context
from tenants.resolvers import api_key_resolver
from tests.factories import record, tree, usage
from tests.quota_helpers import limit

pytestmark = pytest.mark.django_db(transaction=True)

ORG, PROJECT, CALLER, TWIN, SIDE, SIDE_KEY = "acorp", "bproj", "kcall", "ktwin", "bside", "kside"
TREE = {ORG: None, PROJECT: ORG, CALLER: PROJECT, TWIN: PROJECT, SIDE: ORG, SIDE_KEY: SIDE}
HIDDEN_IDS = (ORG, PROJECT, TWIN, SIDE, SIDE_KEY)
FEATURES = ("api_calls", "llm_tokens", "items")
ORG_LIMIT = 79193119
PROJECT_LIMIT = 65537011
TWIN_SPENT = 44231001
SIDE_SPENT = 20000000
CALLER_LIMIT = 900  # per day: the caller's own quota, shown in full
SLACK = 1000  # the caller's own spending moves the ancestors' figures by less than this

ROUTES = [
    {"url_name": "routed-by-name", "feature": "api_calls"},
    {"path_prefix": "/metered/", "feature": "api_calls", "quantity": 3},
]


def credential_resolver(request: HttpRequest) -> TenantContext | str | None:
    """``api_key_resolver`` with the context seen from the key's tenant, as item 1 of issue 10 makes it."""
    context = api_key_resolver(request)
    key = key_for_request(request)
    if isinstance(context, TenantContext) and key is not None:
        return context.seen_from(key.tenant_id)
    return context


class SpendView(ApiView):
    """A DRF view under the API's exception handler whose handler raises ``QuotaExceeded``."""

    def post(self, request: Request) -> Response:
        QuotaPolicyHandler(self.principal.tenant.external_id).consume("api_calls", 1)
        return Response({"ok": True})


urlpatterns = [
    path("api-spend", SpendView.as_view()),
    path("", include("tests.quota_urls")),
    path("", include("project.urls")),
]


@pytest.fixture
def keys(settings) -> dict[str, str]:
    settings.ROOT_URLCONF = "tests.integration.test_leaks"
    settings.METERING = {"QUOTA_ROUTES": ROUTES, "TENANT_RESOLVER": "tests.integration.test_leaks.credential_resolver"}
    tree(TREE)
    for feature in FEATURES:
        limit(ORG, ORG_LIMIT, feature=feature)
        limit(PROJECT, PROJECT_LIMIT, feature=feature)
        limit(CALLER, CALLER_LIMIT, feature=feature, period="day")
        limit(TWIN, 10**9, feature=feature)
        limit(SIDE, 10**9, feature=feature)
        record(TWIN, TWIN_SPENT, feature=feature)
        record(SIDE_KEY, SIDE_SPENT, feature=feature)
    return {
        name: create_api_key(tenant_id, name=name)[1]
        for name, tenant_id in (("caller", CALLER), ("project", PROJECT), ("org", ORG))
    }


def ancestor_figures() -> list[int]:
    """The ancestors' limits, usage and room as the caller starts spending."""
    org_used, project_used = TWIN_SPENT + SIDE_SPENT, TWIN_SPENT
    return [ORG_LIMIT, org_used, ORG_LIMIT - org_used, PROJECT_LIMIT, project_used, PROJECT_LIMIT - project_used]


def text_of(response: Any) -> str:
    head = f"{response.status_code} {response.reason_phrase}\n"
    headers = "".join(f"{name}: {value}\n" for name, value in response.items())
    return head + headers + response.content.decode()


def assert_no_leak(response: Any, figures: list[int] | None = None) -> None:
    text = text_of(response)
    lowered = text.lower()
    for tenant_id in HIDDEN_IDS:
        assert tenant_id not in lowered, f"{tenant_id!r} leaked:\n{text}"
    assert "month" not in lowered, f"an ancestor's period leaked:\n{text}"
    for token in re.findall(r"[0-9]+", text):
        for figure in figures or ancestor_figures():
            assert abs(int(token) - figure) >= SLACK, f"{token} is an ancestor's figure ({figure}):\n{text}"


def call(keys: dict[str, str], point: str, key: str = "caller", tenant: str | None = None) -> Any:
    """One request to an enforcement point with ``key`` (and, to narrow, ``X-Tenant-ID``)."""
    headers = {"Authorization": f"Bearer {keys[key]}"}
    if tenant is not None:
        headers["X-Tenant-ID"] = tenant
    prompt = {"prompt": "one two three"}
    if point == "/async":
        return async_to_sync(AsyncClient().get)(point, headers=headers)
    if point == "/batch":
        return Client().post(point, json.dumps({"items": [1, 2]}), content_type="application/json", headers=headers)
    if point.startswith("/demo/"):
        return Client().post(point, prompt, content_type="application/json", headers=headers)
    if point == "/api-spend":
        return Client().post(point, headers=headers)
    return Client().get(point, headers=headers)


ENFORCED = [
    "/sync",
    "/async",
    "/batch",
    "/class",
    "/drf-decorated",
    "/drf-permission",
    "/routed/by-name",
    "/metered/anything",
    "/demo/completions",
    "/demo/completions-async",
]
RAISING = ["/raising", "/api-spend"]  # QuotaExceeded raised in the view: the middleware, the API's handler


def api(keys: dict[str, str], method: str, url: str, body: Any = None, key: str = "caller", **params: Any) -> Any:
    headers = {"Authorization": f"Bearer {keys[key]}"}
    if method == "get":
        return Client().get(url, params, headers=headers)
    return getattr(Client(), method)(url, json.dumps(body), content_type="application/json", headers=headers)


def fill_the_org() -> None:
    """The other project spends what is left at the org: it refuses everything, while the caller has room."""
    for feature in FEATURES:
        record(SIDE_KEY, Decimal(ORG_LIMIT) - usage(ORG, feature), feature=feature)


def test_allowed_answers_show_only_the_callers_own_levels(keys):
    for point in ENFORCED + RAISING:
        response = call(keys, point)
        assert response.status_code == 200, (point, response.content)
        assert_no_leak(response)
        if point not in RAISING:  # a view's own consume() reports nothing to the headers
            assert re.fullmatch(rf'"{CALLER}/[a-z_]+/day";q={CALLER_LIMIT};w=86400', response["RateLimit-Policy"])
            assert response["RateLimit"].startswith(f'"{CALLER}/')


def test_refusals_by_an_upstream_level_say_only_that_and_when_it_resets(keys):
    fill_the_org()
    figures = [ORG_LIMIT, PROJECT_LIMIT, TWIN_SPENT, PROJECT_LIMIT - TWIN_SPENT]
    before = usage(CALLER, "api_calls"), usage(CALLER, "llm_tokens")
    for point in ENFORCED + RAISING:
        response = call(keys, point)
        assert response.status_code == 429, (point, response.content)
        assert_no_leak(response, figures)
        error = response.json()["error"]
        assert set(error) == {"code", "field", "scope", "message", "feature", "requested", "reset", "retry_after"}
        assert (error["code"], error["scope"]) == ("quota_exceeded", "upstream"), point
        assert error["message"] == "an upstream quota refused this request"
        assert int(response["Retry-After"]) == error["retry_after"] > 0
        if point != "/api-spend":  # the API's exception handler sets Retry-After only, as for any 429 of it
            assert response["RateLimit"] == f'"upstream";r=0;t={response["Retry-After"]}'
        assert not response.has_header("RateLimit-Policy")
    assert (usage(CALLER, "api_calls"), usage(CALLER, "llm_tokens")) == before


def test_a_refusal_by_the_callers_own_level_keeps_every_detail(keys):
    response = api(keys, "get", "/sync")
    assert response.status_code == 200
    record(CALLER, CALLER_LIMIT, feature="api_calls")
    refused = call(keys, "/sync")
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["scope"], error["tenant"], error["limit"], error["period"]) == ("subtree", CALLER, "900", "day")
    assert refused["RateLimit-Policy"] == f'"{CALLER}/api_calls/day";q={CALLER_LIMIT}'
    assert_no_leak(refused)


def test_keys_higher_up_see_their_own_levels_and_no_further(keys):
    allowed = call(keys, "/sync", key="org", tenant=CALLER)
    assert allowed.status_code == 200
    assert f'"{ORG}/api_calls/month";q={ORG_LIMIT}' in allowed["RateLimit-Policy"]
    assert f'"{PROJECT}/api_calls/month";q={PROJECT_LIMIT}' in allowed["RateLimit-Policy"]
    by_project = call(keys, "/sync", key="project", tenant=CALLER)
    assert f'"{PROJECT}/api_calls/month"' in by_project["RateLimit-Policy"] and ORG not in text_of(by_project)

    fill_the_org()
    refused = call(keys, "/sync", key="org", tenant=CALLER)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["scope"], error["tenant"], error["limit"]) == ("subtree", ORG, str(ORG_LIMIT))
    assert Decimal(error["used"]) == ORG_LIMIT and error["period"] == "month"
    assert refused["RateLimit-Policy"] == f'"{ORG}/api_calls/month";q={ORG_LIMIT}'
    for point in ("/raising", "/api-spend"):
        assert call(keys, point, key="org").json()["error"]["tenant"] == ORG
    assert call(keys, "/sync", key="project", tenant=CALLER).json()["error"]["scope"] == "upstream"

    entitlements = api(keys, "get", "/api/v1/entitlements", key="org", tenant_id=CALLER, feature="api_calls").json()
    assert [level["tenant_id"] for level in entitlements["levels"]] == [ORG, PROJECT, CALLER]
    assert entitlements["levels"][0]["quotas"][0]["limit"] == str(ORG_LIMIT)
    assert entitlements["inherited"] is None and entitlements["allowed"] is False


def test_python_callers_keep_every_detail_and_no_viewer_sees_nothing(keys):
    fill_the_org()
    with pytest.raises(QuotaExceeded) as raised:
        QuotaPolicyHandler(CALLER).consume("api_calls", 1)
    error = raised.value
    assert (error.tenant_id, error.limit, error.used) == (ORG, ORG_LIMIT, ORG_LIMIT)
    assert error.as_dict()["tenant"] == ORG
    for viewer in (None, get_context(CALLER).seen_from(get_context(CALLER).tenant.pk)):
        response = quota_exceeded_response(error, seen_by=viewer)
        assert response.status_code == 429 and json.loads(response.content)["error"]["scope"] == "upstream"
        assert_no_leak(response, [ORG_LIMIT])
    shown = quota_exceeded_response(error, seen_by=get_context(CALLER))  # a Python-side context sees everything
    assert json.loads(shown.content)["error"]["tenant"] == ORG


def entitlements(keys: dict[str, str], **params: Any) -> dict[str, Any]:
    response = api(keys, "get", "/api/v1/entitlements", feature="api_calls", **params)
    assert response.status_code == 200, response.content
    assert_no_leak(response, [ORG_LIMIT, PROJECT_LIMIT, TWIN_SPENT])
    return response.json()


def test_entitlements_do_not_move_when_a_sibling_spends(keys):
    asked = [{}, {"quantity": "5"}, {"tenant_id": CALLER, "quantity": "899"}]
    first = [entitlements(keys, **params) for params in asked]
    assert all(answer["inherited"] == {"allowed": True} for answer in first)
    assert [level["tenant_id"] for level in first[0]["levels"]] == [CALLER]

    record(TWIN, 1234567, feature="api_calls")  # the sibling under the same project
    record(SIDE_KEY, 7654321, feature="api_calls")  # and one under another project
    assert [entitlements(keys, **params) for params in asked] == first

    fill_the_org()
    for params, before in zip(asked, first, strict=True):
        after = entitlements(keys, **params)
        assert after["allowed"] is False and after["inherited"] == {"allowed": False}
        assert {**after, "allowed": True, "inherited": {"allowed": True}} == before  # only the one bit moved


def test_rest_endpoints_and_their_errors_name_no_ancestor(keys):
    own_quota = QuotaLimit.objects.get(tenant__external_id=CALLER, feature="api_calls")
    answers = [
        api(keys, "get", "/api/v1/quotas"),
        api(keys, "get", f"/api/v1/quotas/{own_quota.pk}"),
        api(keys, "post", "/api/v1/quotas", {"tenant_id": CALLER, "feature": "x", "limit": 1, "period": "day"}),
        api(keys, "patch", f"/api/v1/quotas/{own_quota.pk}", {"limit": 5}),
        api(keys, "delete", f"/api/v1/quotas/{own_quota.pk}"),
        api(keys, "get", "/api/v1/usage", feature="api_calls", period="day"),
        api(keys, "get", "/api/v1/usage", feature="api_calls", period="total"),
        api(keys, "post", "/api/v1/events", {"events": [{"feature_name": "api_calls", "quantity": 1}]}),
        api(keys, "post", "/api/v1/events", {"events": [{"feature_name": "api_calls", "quantity": -1}]}),
        api(keys, "get", "/api/v1/entitlements", feature="api_calls", quantity="100000000"),
        api(keys, "get", "/api/v1/nowhere"),
    ]
    assert [answer.status_code for answer in answers][:3] == [200, 200, 403]
    assert answers[0].json()["count"] == len(FEATURES)  # the caller's own quotas, no ancestor's
    assert answers[5].json()["total"] == "0" and answers[6].json()["total"] == "0"
    for answer in answers:
        assert answer.status_code < 500, answer.content
        assert_no_leak(answer)


EVENT = {"quantity": 1, "transaction_id": "t1"}


@pytest.mark.parametrize("hidden", [ORG, PROJECT, TWIN, SIDE_KEY])
def test_naming_a_tenant_outside_the_subtree_answers_as_an_unknown_one(keys, hidden):
    org_quota = QuotaLimit.objects.get(tenant__external_id=ORG, feature="api_calls")
    requests = [
        ("get", "/api/v1/usage", None, {"feature": "api_calls", "tenant_id": "@@"}),
        ("get", "/api/v1/entitlements", None, {"feature": "api_calls", "tenant_id": "@@"}),
        ("get", "/api/v1/quotas", None, {"tenant_id": "@@"}),
        ("post", "/api/v1/quotas", {"tenant_id": "@@", "feature": "x", "limit": 1}, {}),
        ("post", "/api/v1/events", {"events": [{"tenant_id": "@@", "feature_name": "x", **EVENT}]}, {}),
    ]
    for method, url, body, params in requests:
        named = json.loads(json.dumps([body, params]).replace("@@", hidden))
        unknown = json.loads(json.dumps([body, params]).replace("@@", "zz-unknown"))
        answer = api(keys, method, url, named[0], **named[1])
        assert answer.status_code in (400, 404, 422), answer.content
        as_unknown = api(keys, method, url, unknown[0], **unknown[1])
        assert answer.status_code == as_unknown.status_code
        assert answer.content.decode().replace(hidden, "zz-unknown") == as_unknown.content.decode()
    foreign, missing = (api(keys, "get", f"/api/v1/quotas/{pk}") for pk in (org_quota.pk, 10**9))
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
