"""``GET /api/v1/usage``: totals of a subtree in a window, with each direct child's share; every bad parameter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.api_helpers import error_of
from tests.factories import any_backdate, record

pytest_plugins = ["tests.api_fixtures"]

URL = "/api/v1/usage"
NOW = datetime.now(UTC)
LAST_YEAR = NOW.replace(year=NOW.year - 1, month=6, day=15)


@pytest.fixture
def facts(forest):
    record("acme-chat-key-1", "10.5", transaction_id="a")
    record("acme-chat-key-2", 4, transaction_id="b")
    record("acme-chat", 1, transaction_id="c")  # the project's own usage: in its total, in no child
    record("acme-search-key-1", 100, transaction_id="d")
    with any_backdate():  # a fact of last year, in the total only
        record("acme-chat-key-1", 1000, transaction_id="old", timestamp=LAST_YEAR)
    record("acme-chat-key-1", 7, feature="api_calls", transaction_id="e")


def test_this_month_by_default_with_children(api, facts):
    response = api.get(URL, feature="llm_tokens")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["tenant_id"] == "acme-chat"
    assert body["period"] == "month"
    assert body["total"] == "15.5"
    assert body["children"] == [
        {"tenant_id": "acme-chat-key-1", "total": "10.5"},
        {"tenant_id": "acme-chat-key-2", "total": "4"},
    ]
    assert body["children_truncated"] is False
    start = datetime.fromisoformat(body["start"])
    assert start == NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    assert body["start"].endswith("Z")


def test_org_view_sums_the_whole_tree(api, facts):
    body = api.get(URL, key="org", feature="llm_tokens").json()
    assert body["total"] == "115.5"
    assert body["children"] == [
        {"tenant_id": "acme-chat", "total": "15.5"},
        {"tenant_id": "acme-search", "total": "100"},
    ]


@pytest.mark.parametrize(
    ("period", "total"), [("hour", "15.5"), ("day", "15.5"), ("month", "15.5"), ("total", "1015.5")]
)
def test_periods(api, facts, period, total):
    body = api.get(URL, feature="llm_tokens", period=period).json()
    assert body["total"] == total
    if period == "total":
        assert body["start"] is None and body["end"] is None
        assert body["children"][0] == {"tenant_id": "acme-chat-key-1", "total": "1010.5"}


def test_at_picks_the_window_holding_it(api, facts):
    body = api.get(URL, feature="llm_tokens", period="month", at=LAST_YEAR.isoformat()).json()
    assert body["total"] == "1000"


def test_a_start_end_range(api, facts):
    start = (LAST_YEAR - timedelta(minutes=1)).isoformat()
    end = (LAST_YEAR + timedelta(minutes=1)).isoformat()
    body = api.get(URL, feature="llm_tokens", start=start, end=end).json()
    assert body["period"] is None
    assert body["total"] == "1000"
    assert body["children"][0] == {"tenant_id": "acme-chat-key-1", "total": "1000"}


def test_an_open_ended_range(api, facts):
    body = api.get(URL, feature="llm_tokens", start=(NOW - timedelta(days=40)).isoformat()).json()
    assert body["total"] == "15.5" and body["end"] is None


def test_an_unencoded_plus_in_the_offset_is_understood(api, facts):
    # A client that forgets to encode "+" sends a space.
    response = api.client.get(f"{URL}?feature=llm_tokens&at=2020-01-01T10:00:00+02:00", headers=api.headers("project"))
    assert response.status_code == 200, response.content
    assert response.json()["start"] == "2020-01-01T00:00:00Z"


def test_a_descendant_and_other_features(api, facts):
    body = api.get(URL, tenant_id="acme-chat-key-1", feature="api_calls").json()
    assert body["total"] == "7" and body["children"] == []


def test_an_unused_feature_is_zero(api, facts):
    assert api.get(URL, feature="never_used").json()["total"] == "0"


@pytest.mark.parametrize(
    ("params", "code", "field"),
    [
        ({}, "required", "feature"),
        ({"feature": ""}, "blank", "feature"),
        ({"feature": "bad name"}, "invalid_feature_name", "feature"),
        ({"feature": "x" * 101}, "invalid_feature_name", "feature"),
        ({"feature": "tökens"}, "invalid_feature_name", "feature"),
        ({"feature": "llm_tokens", "period": "week"}, "invalid_choice", "period"),
        ({"feature": "llm_tokens", "start": "2025-01-01T00:00:00"}, "invalid_datetime", "start"),
        ({"feature": "llm_tokens", "end": "tomorrow"}, "invalid_datetime", "end"),
        ({"feature": "llm_tokens", "at": "2025-13-01T00:00:00Z"}, "invalid_datetime", "at"),
        (
            {"feature": "llm_tokens", "start": "2025-02-01T00:00:00Z", "end": "2025-01-01T00:00:00Z"},
            "invalid_range",
            "end",
        ),
        (
            {"feature": "llm_tokens", "period": "day", "start": "2025-01-01T00:00:00Z"},
            "conflicting_parameters",
            "period",
        ),
        ({"feature": "llm_tokens", "tenant": "acme-chat"}, "unknown_field", "tenant"),
        ({"feature": "llm_tokens", "tenant_id": "x" * 129}, "max_length", "tenant_id"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(api, forest, params, code, field):
    response = api.get(URL, **params)
    assert response.status_code == 400, response.content
    error = error_of(response)
    assert (error["code"], error["field"]) == (code, field)


def test_an_unknown_tenant_is_404(api, forest):
    response = api.get(URL, tenant_id="no-such-tenant", feature="llm_tokens")
    assert response.status_code == 404
    assert error_of(response) == {
        "code": "unknown_tenant",
        "field": "tenant_id",
        "message": "unknown tenant 'no-such-tenant'",
    }


def test_an_inactive_tenant_still_reports_its_usage(api, facts):
    from tenants.lineage import invalidate
    from tenants.models import Tenant

    Tenant.objects.filter(external_id="acme-chat-key-2").update(is_active=False)
    invalidate(["acme-chat-key-2"])
    assert api.get(URL, tenant_id="acme-chat-key-2", feature="llm_tokens").json()["total"] == "4"
