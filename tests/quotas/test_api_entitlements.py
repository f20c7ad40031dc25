"""``GET /api/v1/entitlements``: allowed, remaining and reset per visible level; ancestors only as one bit."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from metering.models import UsageRecord
from quotas.models import QuotaReservation
from tests.api_helpers import error_of
from tests.factories import record, usage
from tests.quota_helpers import limit, set_exempt

pytest_plugins = ["tests.api_fixtures"]

URL = "/api/v1/entitlements"


@pytest.fixture
def limits(forest):
    limit("acme", 1000)  # above the project key: someone else's
    limit("acme-chat", 100, period="day")
    limit("acme-chat-key-1", 20)
    limit("acme-chat-key-1", 500, period="total", enforcement="soft")
    record("acme-chat-key-1", 15, transaction_id="a")
    record("acme-chat-key-2", 60, transaction_id="b")
    record("acme-search-key-1", 800, transaction_id="c")


def month_end() -> str:
    now = datetime.now(UTC)
    following = now.replace(year=now.year + 1, month=1) if now.month == 12 else now.replace(month=now.month + 1)
    return following.replace(day=1, hour=0, minute=0, second=0, microsecond=0).isoformat().replace("+00:00", "Z")


def test_levels_from_the_keys_tenant_down_with_every_quota(api, limits):
    response = api.get(URL, tenant_id="acme-chat-key-1", feature="llm_tokens", quantity=5)
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["tenant_id"], body["feature"], body["quantity"]) == ("acme-chat-key-1", "llm_tokens", "5")
    assert body["allowed"] is True and body["exempt"] is False
    project, key = body["levels"]
    assert project["tenant_id"] == "acme-chat"
    assert project["allowed"] is True and project["remaining"] == "25"
    assert project["quotas"][0]["limit"] == "100" and project["quotas"][0]["used"] == "75"
    assert key["tenant_id"] == "acme-chat-key-1"
    assert key["remaining"] == "5" and key["reset_at"] == month_end()
    by_period = {quota["period"]: quota for quota in key["quotas"]}
    assert by_period["month"] == {
        "id": by_period["month"]["id"],
        "period": "month",
        "enforcement": "hard",
        "limit": "20",
        "used": "15",
        "remaining": "5",
        "reset_at": month_end(),
        "allowed": True,
    }
    assert by_period["total"]["enforcement"] == "soft" and by_period["total"]["reset_at"] is None
    assert body["remaining"] == "5"


def test_ancestors_contribute_only_whether_the_quantity_fits(api, limits):
    body = api.get(URL, tenant_id="acme-chat-key-1", feature="llm_tokens").json()
    assert body["inherited"] == {"allowed": True}
    text = json.dumps(body)
    # no id, limit, usage or room of acme (1000, 875 used, 125 left)
    assert '"acme"' not in text and "1000" not in text and "875" not in text and "125" not in text
    record("acme-search-key-1", 100, transaction_id="d")  # a tenant the key cannot see spends under acme
    assert api.get(URL, tenant_id="acme-chat-key-1", feature="llm_tokens").json() == body


def test_a_root_key_has_nothing_inherited(api, limits):
    body = api.get(URL, key="org", tenant_id="acme-chat-key-1", feature="llm_tokens").json()
    assert [level["tenant_id"] for level in body["levels"]] == ["acme", "acme-chat", "acme-chat-key-1"]
    assert body["inherited"] is None
    assert body["levels"][0]["remaining"] == "125"


def test_blocked_at_a_visible_level(api, limits):
    body = api.get(URL, tenant_id="acme-chat-key-1", feature="llm_tokens", quantity=6).json()
    assert body["allowed"] is False
    project, key = body["levels"]
    assert project["allowed"] is True and project["remaining"] == "25"
    assert key["allowed"] is False and key["remaining"] == "5"
    assert [quota["allowed"] for quota in key["quotas"] if quota["period"] == "month"] == [False]


def test_blocked_by_an_ancestor(api, limits):
    record("acme-search-key-1", 120, transaction_id="d")  # acme: 995 of 1000 used
    body = api.get(URL, tenant_id="acme-chat-key-2", feature="llm_tokens", quantity=5).json()
    assert body["allowed"] is True
    body = api.get(URL, tenant_id="acme-chat-key-2", feature="llm_tokens", quantity=6).json()
    assert body["allowed"] is False
    assert body["inherited"] == {"allowed": False}
    assert [level["allowed"] for level in body["levels"]] == [True, True]
    assert body["remaining"] == "25"  # the tightest the key may see (acme-chat's day), not acme's 5


def test_checking_consumes_nothing(api, limits):
    facts, before = UsageRecord.objects.count(), usage("acme")
    for quantity in (1, 5, 10**6):
        api.get(URL, tenant_id="acme-chat-key-1", feature="llm_tokens", quantity=quantity)
    assert UsageRecord.objects.count() == facts and usage("acme") == before
    assert not QuotaReservation.objects.exists()


def test_quantity_defaults_to_1_and_accepts_decimals(api, limits):
    assert api.get(URL, feature="llm_tokens").json()["quantity"] == "1"
    assert api.get(URL, feature="llm_tokens", quantity="0.5").json()["quantity"] == "0.5"


def test_unlimited(api, forest):
    body = api.get(URL, feature="api_calls").json()
    assert body["allowed"] is True and body["remaining"] is None and body["reset_at"] is None
    assert body["levels"] == [
        {"tenant_id": "acme-chat", "allowed": True, "remaining": None, "reset_at": None, "quotas": []}
    ]
    assert body["inherited"] == {"allowed": True}


def test_an_exempt_tree_is_always_allowed(api, limits):
    set_exempt("acme")
    body = api.get(URL, tenant_id="acme-chat-key-1", feature="llm_tokens", quantity=10**6).json()
    assert body["allowed"] is True and body["exempt"] is True


def test_an_inactive_tenant_is_403(api, limits):
    from tenants.lineage import invalidate
    from tenants.models import Tenant

    Tenant.objects.filter(external_id="acme-chat-key-2").update(is_active=False)
    invalidate(["acme-chat-key-2"])
    response = api.get(URL, tenant_id="acme-chat-key-2", feature="llm_tokens")
    assert response.status_code == 403 and error_of(response)["code"] == "inactive_tenant"


@pytest.mark.redis
def test_on_redis_counters_too(api, limits, redis_cache):
    body = api.get(URL, tenant_id="acme-chat-key-1", feature="llm_tokens", quantity=5).json()
    assert body["allowed"] is True and body["levels"][1]["remaining"] == "5"
    assert api.get(URL, tenant_id="acme-chat-key-1", feature="llm_tokens", quantity=6).json()["allowed"] is False


@pytest.mark.parametrize(
    ("params", "status", "code", "field"),
    [
        ({}, 400, "required", "feature"),
        ({"feature": "bad name"}, 400, "invalid_feature_name", "feature"),
        ({"feature": "llm_tokens", "quantity": "NaN"}, 400, "invalid_quantity", "quantity"),
        ({"feature": "llm_tokens", "quantity": "-1"}, 400, "invalid_quantity", "quantity"),
        ({"feature": "llm_tokens", "quantity": "lots"}, 400, "invalid_quantity", "quantity"),
        ({"feature": "llm_tokens", "quantity": "1.0000001"}, 400, "invalid_quantity", "quantity"),
        ({"feature": "llm_tokens", "qty": "1"}, 400, "unknown_field", "qty"),
        ({"feature": "llm_tokens", "tenant_id": "nope"}, 404, "unknown_tenant", "tenant_id"),
        ({"feature": "llm_tokens", "tenant_id": "acme"}, 404, "unknown_tenant", "tenant_id"),
    ],
)
def test_bad_parameters(api, forest, params, status, code, field):
    response = api.get(URL, **params)
    assert response.status_code == status, response.content
    assert (error_of(response)["code"], error_of(response)["field"]) == (code, field)
