"""``/api/v1/quotas``: list, create, retrieve, update, delete in the key's subtree; no self-escalation; bad input."""

from __future__ import annotations

import pytest

from quotas.handler import QuotaPolicyHandler
from quotas.models import QuotaLimit
from tests.api_helpers import error_of
from tests.quota_helpers import limit

pytest_plugins = ["tests.api_fixtures"]

URL = "/api/v1/quotas"


@pytest.fixture
def quotas(forest):
    """One quota at each tenant (llm_tokens per month), plus a daily one on acme-chat-key-1."""
    made = {tenant: limit(tenant, 1000) for tenant in forest}
    made["acme-chat-key-1/day"] = limit("acme-chat-key-1", 50, period="day")
    return made


def body(**fields):
    base = {"tenant_id": "acme-chat-key-1", "feature": "api_calls", "limit": "100"}
    base.update(fields)
    return base


# ---- list ----


def test_list_shows_the_keys_subtree_only(api, quotas):
    response = api.get(URL)
    assert response.status_code == 200, response.content
    page = response.json()
    assert page["count"] == 4
    assert {row["tenant_id"] for row in page["results"]} == {"acme-chat", "acme-chat-key-1", "acme-chat-key-2"}
    assert page["next"] is None and page["previous"] is None


def test_list_is_paginated(api, quotas):
    first = api.get(URL, key="org", page_size=2).json()
    assert first["count"] == 7 and len(first["results"]) == 2 and first["next"]
    ids = {row["id"] for row in first["results"]}
    third = api.get(URL, key="org", page_size=2, page=4).json()
    assert len(third["results"]) == 1 and third["next"] is None
    assert not ids & {row["id"] for row in third["results"]}


def test_list_filters(api, quotas):
    assert api.get(URL, tenant_id="acme-chat-key-1").json()["count"] == 2
    assert api.get(URL, tenant_id="acme-chat-key-1", period="day").json()["count"] == 1
    assert api.get(URL, feature="api_calls").json()["count"] == 0


def test_a_row_shows_every_field(api, quotas):
    row = api.get(URL, tenant_id="acme-chat-key-1", period="day").json()["results"][0]
    assert row == {
        "id": quotas["acme-chat-key-1/day"].pk,
        "tenant_id": "acme-chat-key-1",
        "feature": "llm_tokens",
        "limit": "50",
        "period": "day",
        "enforcement": "hard",
        "warning_thresholds": [80, 100],
        "is_active": True,
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }
    assert row["created_at"].endswith("Z")


@pytest.mark.parametrize(
    ("params", "status", "code", "field"),
    [
        ({"page": 99}, 404, "invalid_page", "page"),
        ({"page": 0}, 400, "min_value", "page"),
        ({"page": "x"}, 400, "invalid", "page"),
        ({"page_size": 501}, 400, "max_value", "page_size"),
        ({"period": "week"}, 400, "invalid_choice", "period"),
        ({"tenant_id": "no-such"}, 404, "unknown_tenant", "tenant_id"),
        ({"tenant_id": "acme"}, 404, "unknown_tenant", "tenant_id"),
        ({"tenant": "acme-chat"}, 400, "unknown_field", "tenant"),
    ],
)
def test_bad_list_parameters(api, quotas, params, status, code, field):
    response = api.get(URL, **params)
    assert response.status_code == status, response.content
    assert (error_of(response)["code"], error_of(response)["field"]) == (code, field)


# ---- create ----


def test_create_below_the_keys_tenant(api, forest, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(URL, body(limit=3, period="day", warning_thresholds=[50]))
    assert response.status_code == 201, response.content
    created = response.json()
    assert created["limit"] == "3" and created["period"] == "day" and created["enforcement"] == "hard"
    assert created["warning_thresholds"] == [50] and created["is_active"] is True
    quota = QuotaLimit.objects.get(pk=created["id"])
    assert quota.tenant.external_id == "acme-chat-key-1"
    # And it is enforced at once.
    assert QuotaPolicyHandler("acme-chat-key-1").check("api_calls", 4).allowed is False
    assert QuotaPolicyHandler("acme-chat-key-1").check("api_calls", 3).allowed is True


def test_create_defaults_and_exact_limits(api, forest):
    created = api.post(URL, body(limit="0.000001")).json()
    assert created["limit"] == "0.000001"
    assert (created["period"], created["enforcement"], created["warning_thresholds"]) == ("month", "hard", [80, 100])
    soft = api.post(URL, body(feature="other", limit=10**12, enforcement="soft", is_active=False)).json()
    assert (soft["limit"], soft["enforcement"], soft["is_active"]) == ("1000000000000", "soft", False)


def test_create_on_its_own_tenant_is_forbidden(api, forest):
    response = api.post(URL, body(tenant_id="acme-chat"))
    assert response.status_code == 403
    assert (error_of(response)["code"], error_of(response)["field"]) == ("self_escalation_forbidden", "tenant_id")
    assert not QuotaLimit.objects.exists()


@pytest.mark.parametrize("tenant", ["acme", "acme-search", "acme-search-key-1", "other", "no-such-tenant"])
def test_create_outside_the_subtree_is_404_like_a_missing_tenant(api, forest, tenant):
    response = api.post(URL, body(tenant_id=tenant))
    assert response.status_code == 404
    assert error_of(response) == {
        "code": "unknown_tenant",
        "field": "tenant_id",
        "message": f"unknown tenant {tenant!r}",
    }
    assert not QuotaLimit.objects.exists()


def test_create_twice_is_a_conflict(api, forest):
    assert api.post(URL, body()).status_code == 201
    response = api.post(URL, body(limit=5))
    assert response.status_code == 409
    assert error_of(response)["code"] == "quota_exists"
    assert QuotaLimit.objects.get().limit == 100


BAD_BODIES = [
    (body(tenant_id=None), "null", "tenant_id"),
    ({"feature": "x", "limit": 1}, "required", "tenant_id"),
    ({"tenant_id": "acme-chat-key-1", "limit": 1}, "required", "feature"),
    ({"tenant_id": "acme-chat-key-1", "feature": "x"}, "required", "limit"),
    (body(tenant_id=5), "invalid", "tenant_id"),
    (body(feature=""), "blank", "feature"),
    (body(feature="bad name"), "invalid_feature_name", "feature"),
    (body(feature=7), "invalid", "feature"),
    (body(limit="-1"), "invalid_limit", "limit"),
    (body(limit="NaN"), "invalid_limit", "limit"),
    (body(limit="abc"), "invalid_limit", "limit"),
    (body(limit=True), "invalid_limit", "limit"),
    (body(limit="0.0000001"), "invalid_limit", "limit"),
    (body(limit=10**18), "invalid_limit", "limit"),  # past the column (a limit may exceed MAX_QUANTITY)
    (body(limit="1" + "0" * 25), "invalid_limit", "limit"),
    (body(limit=None), "null", "limit"),
    (body(period="week"), "invalid_choice", "period"),
    (body(enforcement="maybe"), "invalid_choice", "enforcement"),
    (body(warning_thresholds=[0]), "min_value", "warning_thresholds.0"),
    (body(warning_thresholds=[80, 101]), "max_value", "warning_thresholds.1"),
    (body(warning_thresholds=["80"]), "invalid", "warning_thresholds.0"),
    (body(warning_thresholds=[True]), "invalid", "warning_thresholds.0"),
    (body(warning_thresholds=80), "not_a_list", "warning_thresholds"),
    (body(is_active="yes"), "invalid", "is_active"),
    (body(is_active=1), "invalid", "is_active"),
    (body(limits=5), "unknown_field", "limits"),
    (body(id=5), "unknown_field", "id"),
]


@pytest.mark.parametrize(("payload", "code", "field"), BAD_BODIES)
def test_bad_creates_are_400_naming_the_field(api, forest, payload, code, field):
    response = api.post(URL, payload)
    assert response.status_code == 400, response.content
    error = error_of(response)
    assert (error["code"], error["field"]) == (code, field)
    assert not QuotaLimit.objects.exists()


@pytest.mark.parametrize(
    ("raw", "code"), [("[1]", "invalid_body"), ("{bad", "invalid_json"), ('{"limit": NaN}', "invalid_json")]
)
def test_bad_json_bodies(api, forest, raw, code):
    response = api.post(URL, raw=raw)
    assert response.status_code == 400
    assert error_of(response)["code"] == code


# ---- retrieve, update, delete ----


def test_retrieve_own_and_below(api, quotas):
    for tenant in ("acme-chat", "acme-chat-key-2"):
        response = api.get(f"{URL}/{quotas[tenant].pk}")
        assert response.status_code == 200
        assert response.json()["tenant_id"] == tenant


@pytest.mark.parametrize("tenant", ["acme", "acme-search", "other-project"])
def test_quotas_outside_the_subtree_read_as_missing(api, quotas, tenant):
    quota_id = quotas[tenant].pk
    missing_id = QuotaLimit.objects.order_by("-pk").first().pk + 1000
    for path_id in (quota_id, missing_id):
        for response in (
            api.get(f"{URL}/{path_id}"),
            api.patch(f"{URL}/{path_id}", {"limit": 1}),
            api.put(f"{URL}/{path_id}", body(limit=1)),
            api.delete(f"{URL}/{path_id}"),
        ):
            assert response.status_code == 404
            assert error_of(response) == {"code": "not_found", "field": "id", "message": f"no quota '{path_id}'"}
    assert QuotaLimit.objects.get(pk=quota_id).limit == 1000


@pytest.mark.parametrize("path_id", ["abc", "1.5", "-1", "99999999999999999999999"])
def test_malformed_ids_are_404(api, quotas, path_id):
    response = api.get(f"{URL}/{path_id}")
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


def test_patch_changes_a_childs_quota(api, quotas, django_capture_on_commit_callbacks):
    quota = quotas["acme-chat-key-1"]
    with django_capture_on_commit_callbacks(execute=True):
        response = api.patch(f"{URL}/{quota.pk}", {"limit": "5.5", "enforcement": "soft"})
    assert response.status_code == 200, response.content
    assert (response.json()["limit"], response.json()["enforcement"]) == ("5.5", "soft")
    quota.refresh_from_db()
    assert str(quota.limit.normalize()) == "5.5" and quota.enforcement == "soft"


def test_put_replaces_the_mutable_fields(api, quotas):
    quota = quotas["acme-chat-key-1"]
    response = api.put(f"{URL}/{quota.pk}", {"limit": 7, "tenant_id": "acme-chat-key-1", "feature": "llm_tokens"})
    assert response.status_code == 200, response.content
    assert response.json()["limit"] == "7" and response.json()["warning_thresholds"] == [80, 100]
    assert api.put(f"{URL}/{quota.pk}", {"enforcement": "soft"}).status_code == 400  # limit is required


@pytest.mark.parametrize(
    ("change", "field"),
    [({"tenant_id": "acme-chat-key-2"}, "tenant_id"), ({"feature": "other"}, "feature"), ({"period": "day"}, "period")],
)
def test_a_quotas_identity_is_immutable(api, quotas, change, field):
    quota = quotas["acme-chat-key-1"]
    response = api.patch(f"{URL}/{quota.pk}", change)
    assert response.status_code == 400
    assert (error_of(response)["code"], error_of(response)["field"]) == ("immutable_field", field)


@pytest.mark.parametrize(
    ("payload", "code", "field"),
    [
        ({"limit": "-5"}, "invalid_limit", "limit"),
        ({"limit": None}, "null", "limit"),
        ({"warning_thresholds": [200]}, "max_value", "warning_thresholds.0"),
        ({"colour": "red"}, "unknown_field", "colour"),
    ],
)
def test_bad_updates_are_400(api, quotas, payload, code, field):
    quota = quotas["acme-chat-key-1"]
    response = api.patch(f"{URL}/{quota.pk}", payload)
    assert response.status_code == 400
    assert (error_of(response)["code"], error_of(response)["field"]) == (code, field)
    quota.refresh_from_db()
    assert quota.limit == 1000


def test_delete_a_childs_quota(api, quotas):
    quota = quotas["acme-chat-key-2"]
    assert api.delete(f"{URL}/{quota.pk}").status_code == 204
    assert not QuotaLimit.objects.filter(pk=quota.pk).exists()


# ---- no self-escalation ----


@pytest.mark.parametrize("key", ["project", "child", "org"])
def test_no_key_changes_or_deletes_its_own_tenants_quota(api, quotas, key):
    own = {"project": "acme-chat", "child": "acme-chat-key-1", "org": "acme"}[key]
    quota = quotas[own]
    for response in (
        api.patch(f"{URL}/{quota.pk}", {"limit": 10**9}, key=key),
        api.put(f"{URL}/{quota.pk}", body(tenant_id=own, feature="llm_tokens", limit=10**9), key=key),
        api.delete(f"{URL}/{quota.pk}", key=key),
        api.post(URL, body(tenant_id=own, feature="new_feature"), key=key),
    ):
        assert response.status_code == 403, response.content
        assert error_of(response)["code"] == "self_escalation_forbidden"
    quota.refresh_from_db()
    assert quota.limit == 1000
    assert QuotaLimit.objects.filter(feature="new_feature").count() == 0


def test_a_child_key_cannot_touch_its_parents_quota(api, quotas):
    parent_quota = quotas["acme-chat"]
    assert api.patch(f"{URL}/{parent_quota.pk}", {"limit": 10**9}, key="child").status_code == 404
    assert api.delete(f"{URL}/{parent_quota.pk}", key="child").status_code == 404
    parent_quota.refresh_from_db()
    assert parent_quota.limit == 1000


def test_the_parent_may_change_what_the_child_may_not(api, quotas):
    quota = quotas["acme-chat-key-1"]
    assert api.patch(f"{URL}/{quota.pk}", {"limit": 1}, key="child").status_code == 403
    assert api.patch(f"{URL}/{quota.pk}", {"limit": 1}, key="project").status_code == 200
    assert api.patch(f"{URL}/{quota.pk}", {"limit": 2}, key="org").status_code == 200


def test_a_child_quota_above_the_parents_does_not_lift_the_parents(api, quotas, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        api.patch(f"{URL}/{quotas['acme-chat-key-1'].pk}", {"limit": 10**9}, key="project")
        api.patch(f"{URL}/{quotas['acme-chat-key-1/day'].pk}", {"limit": 10**9}, key="project")
    assert QuotaPolicyHandler("acme-chat-key-1").check("llm_tokens", 1001).allowed is False  # acme-chat's 1000


def test_a_limit_may_exceed_one_facts_maximum_up_to_what_the_column_holds(api, forest):
    """A limit bounds a window's total, not one fact: far above MAX_QUANTITY, exactly, and refused past the column."""
    from quotas.models import stored_exactly

    largest = "999999999999999999.999999" if stored_exactly(10**24 - 1) else "999999999999999000"
    created = api.post(URL, body(limit=largest))
    assert created.status_code == 201, created.json()
    assert created.json()["limit"] == largest
    beyond = api.post(URL, body(feature="other", limit="1000000000000000000"))
    assert beyond.status_code == 400 and beyond.json()["error"]["field"] == "limit"
