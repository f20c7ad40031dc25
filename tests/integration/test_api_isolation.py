"""The isolation matrix: every endpoint x every kind of foreign or unusable key, against acme-chat's data.

The victim is acme-chat's subtree (its own usage and the quota of acme-chat-key-2). The attackers: a sibling
(acme-search), a child (acme-chat-key-1 — below acme-chat, but acme-chat and acme-chat-key-2 are outside its own
subtree), an unrelated tree (other), and revoked, expired, malformed or missing keys. Every read and write answers
404 exactly as for a tenant or quota that does not exist (or 401 for an unusable key), and nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from metering.models import UsageRecord
from quotas.models import QuotaLimit
from tests.api_helpers import Api, error_of, event
from tests.factories import record
from tests.quota_helpers import limit

pytest_plugins = ["tests.api_fixtures"]


@pytest.fixture
def victim(forest) -> dict[str, Any]:
    record("acme-chat-key-2", 42, transaction_id="secret-usage")
    quota = limit("acme-chat-key-2", 100)
    limit("acme-chat", 500)
    return {"quota_id": quota.pk, "missing_quota_id": quota.pk + 10_000}


Operation = Callable[[Api, str | None, str], Any]


def _quota(path_id: str) -> str:
    return f"/api/v1/quotas/{path_id}"


# name -> (request given a key and the target, which target: a tenant or a quota id)
OPERATIONS: dict[str, tuple[Operation, str]] = {
    "POST events": (
        lambda api, key, target: api.post(
            "/api/v1/events", {"events": [event(tenant_id=target, transaction_id="x")]}, key=key
        ),
        "tenant",
    ),
    "GET usage": (
        lambda api, key, target: api.get("/api/v1/usage", key=key, tenant_id=target, feature="llm_tokens"),
        "tenant",
    ),
    "GET entitlements": (
        lambda api, key, target: api.get("/api/v1/entitlements", key=key, tenant_id=target, feature="llm_tokens"),
        "tenant",
    ),
    "GET quotas?tenant_id": (lambda api, key, target: api.get("/api/v1/quotas", key=key, tenant_id=target), "child"),
    "POST quotas": (
        lambda api, key, target: api.post(
            "/api/v1/quotas", {"tenant_id": target, "feature": "api_calls", "limit": 1}, key=key
        ),
        "child",
    ),
    "GET quota": (lambda api, key, target: api.get(_quota(target), key=key), "quota"),
    "PATCH quota": (lambda api, key, target: api.patch(_quota(target), {"limit": 10**9}, key=key), "quota"),
    "PUT quota": (
        lambda api, key, target: api.put(
            _quota(target), {"tenant_id": "acme-chat-key-2", "feature": "llm_tokens", "limit": 10**9}, key=key
        ),
        "quota",
    ),
    "DELETE quota": (lambda api, key, target: api.delete(_quota(target), key=key), "quota"),
}


def targets(victim: dict[str, Any], kind: str) -> tuple[str, str]:
    """(the victim's real target, a target that does not exist) for an operation."""
    return {
        "tenant": ("acme-chat", "no-such-tenant"),
        "child": ("acme-chat-key-2", "no-such-tenant"),
        "quota": (str(victim["quota_id"]), str(victim["missing_quota_id"])),
    }[kind]


def run(api: Api, operation: str, key: str | None, victim: dict[str, Any], real: bool = True) -> Any:
    request, kind = OPERATIONS[operation]
    return request(api, key, targets(victim, kind)[0 if real else 1])


FOREIGN = ["sibling", "child", "unrelated"]
UNUSABLE = ["revoked", "expired", "malformed", "no key"]


def snapshot() -> tuple[Any, ...]:
    return (
        list(UsageRecord.objects.order_by("pk").values_list("pk", "units")),
        list(QuotaLimit.objects.order_by("pk").values_list("pk", "limit", "is_active", "enforcement")),
    )


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("caller", FOREIGN)
def test_foreign_keys_see_404_exactly_as_for_nothing(api, victim, caller, operation):
    before = snapshot()
    foreign = run(api, operation, caller, victim)
    missing = run(api, operation, caller, victim, real=False)
    assert snapshot() == before, "a foreign key wrote something"
    if operation == "POST events":
        # Per index, inside the 422: nothing tells a foreign tenant from a missing one either.
        assert foreign.status_code == missing.status_code == 422
        assert error_of(foreign)["details"] == {"0": {"tenant_id": ["unknown_tenant"]}}
    else:
        assert foreign.status_code == missing.status_code == 404, foreign.content
    real_target, missing_target = targets(victim, OPERATIONS[operation][1])
    # The same body, but for the name the caller itself sent.
    assert foreign.content.decode().replace(f"'{real_target}'", f"'{missing_target}'") == missing.content.decode()
    # The victim's usage (42) never shows; the target's own name may hold those digits (a quota id like 142).
    assert "42" not in foreign.content.decode().replace(f"'{real_target}'", "")


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("caller", UNUSABLE)
def test_unusable_keys_are_401(api, victim, caller, operation):
    before = snapshot()
    key = {"no key": None, "malformed": "xk_not-a-key"}.get(caller, caller)
    response = run(api, operation, key, victim)
    assert response.status_code == 401, response.content
    assert response["WWW-Authenticate"].startswith("Bearer")
    error = error_of(response)
    assert error["code"] == ("not_authenticated" if caller == "no key" else "invalid_api_key")
    assert error["field"] == "Authorization"
    assert snapshot() == before


@pytest.mark.parametrize("caller", [*FOREIGN, "project"])
def test_quota_lists_never_include_other_subtrees(api, victim, caller):
    rows = api.get("/api/v1/quotas", key=caller).json()["results"]
    own = {"sibling": "acme-search", "child": "acme-chat-key-1", "unrelated": "other", "project": "acme-chat"}[caller]
    from tenants.models import Tenant

    path = Tenant.objects.get(external_id=own).path
    allowed = set(Tenant.objects.filter(path__startswith=path).values_list("external_id", flat=True))
    assert {row["tenant_id"] for row in rows} <= allowed
    if caller == "project":
        assert {row["tenant_id"] for row in rows} == {"acme-chat", "acme-chat-key-2"}


def test_the_owner_is_served_by_the_same_requests(api, victim):
    """The matrix is not vacuous: acme-chat's own key gets what the others were refused."""
    results = {name: run(api, name, "project", victim).status_code for name in OPERATIONS}
    assert results == {
        "POST events": 201,
        "GET usage": 200,
        "GET entitlements": 200,
        "GET quotas?tenant_id": 200,
        "POST quotas": 201,
        "GET quota": 200,
        "PATCH quota": 200,
        "PUT quota": 200,
        "DELETE quota": 204,
    }


def test_a_deactivated_tenants_key_is_refused(api, victim):
    from tenants.lineage import invalidate
    from tenants.models import Tenant

    Tenant.objects.filter(external_id="acme").update(is_active=False)
    invalidate(Tenant.objects.values_list("external_id", flat=True))
    before = snapshot()
    for name in OPERATIONS:
        response = run(api, name, "project", victim)
        assert response.status_code == 403, (name, response.content)
        assert error_of(response)["code"] == "inactive_tenant"
    assert snapshot() == before
