"""Attacks on what a key holder can learn about tenants outside its subtree: existence oracles by cost.

A tenant of another tree must cost exactly what an id that names no tenant costs, on every path that takes a tenant
id from the caller — not only the ``X-Tenant-ID`` narrowing (``tests/tenants/test_identity.py``), also the
``tenant_id`` of
each event of ``POST /api/v1/events`` (up to 1,000 per request: an amplifier) and the ``tenant_id`` parameter of
``/usage``, ``/entitlements`` and ``/quotas``. Before the fix an event batch read the lineage of every id it named
(and cached it in a shared cache), so a batch of foreign ids answered measurably faster than a batch of unknown ones
(2.5x on PostgreSQL for 300 ids), listing which ids exist in other trees.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext

from metering.api.base import tenant_in_scope
from metering.api.errors import ApiError
from tenants.apikeys import authenticate_key, create_api_key
from tenants.authentication import TenantPrincipal
from tenants.tree import create_tenant
from tests.factories import tree
from tests.timing import interleaved_medians, ratio

pytestmark = pytest.mark.django_db(transaction=True)

FOREIGN = 200  # tenants of another tree the attacker names in one batch


@pytest.fixture
def world() -> dict[str, Any]:
    tree({"org": None, "mine": "org", "mine-kid": "mine", "far": None, "far-project": "far"})
    for index in range(FOREIGN):
        create_tenant(f"far-{index}", parent="far-project")
    return {"key": create_api_key("mine")[1]}


def batch(prefix: str, count: int = FOREIGN) -> str:
    events = [
        {"tenant_id": f"{prefix}{index}", "feature_name": "x", "quantity": 1, "transaction_id": f"t{index}"}
        for index in range(count)
    ]
    return json.dumps({"events": events})


def post(key: str, body: str) -> Any:
    return Client().post(
        "/api/v1/events", body, content_type="application/json", headers={"Authorization": f"Bearer {key}"}
    )


def shared_cache(tmp_path: Any) -> override_settings:
    # A cache every process shares (lineages are cached only in one): the file cache needs no service.
    return override_settings(
        CACHES={
            "default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(tmp_path)}
        }
    )


def test_an_event_batch_costs_the_same_queries_for_tenants_of_another_tree_as_for_unknown_ids(world, tmp_path):
    with shared_cache(tmp_path):
        post(world["key"], batch("far-", 3))  # a foreign lineage read once would now be cached
        shapes = {}
        for prefix in ("far-", "nobody-"):
            with CaptureQueriesContext(connection) as queries:
                response = post(world["key"], batch(prefix, 3))
            assert response.status_code == 422
            assert response.json()["error"]["messages"]["0"] == {"tenant_id": [f"unknown tenant '{prefix}0'"]}
            shapes[prefix] = [query["sql"].replace(prefix, "?") for query in queries.captured_queries]
    assert shapes["far-"] == shapes["nobody-"]


def test_an_event_batch_takes_the_same_time_for_tenants_of_another_tree_as_for_unknown_ids(world):
    bodies = {"far-": batch("far-"), "nobody-": batch("nobody-")}

    def send(prefix: str) -> None:
        assert post(world["key"], bodies[prefix]).status_code == 422

    medians = interleaved_medians(send, list(bodies), 14, skip=2)
    assert ratio(medians) < 1.3, medians


def test_events_for_the_subtree_are_still_recorded_next_to_refused_foreign_ids(world):
    ok = json.dumps(
        {
            "events": [
                {"tenant_id": "mine-kid", "feature_name": "x", "quantity": 2, "transaction_id": "a"},
                {"feature_name": "x", "quantity": 3, "transaction_id": "b"},
            ]
        }
    )
    response = post(world["key"], ok)
    assert response.status_code == 201, response.content
    assert [row["tenant_id"] for row in response.json()["results"]] == ["mine-kid", "mine"]
    mixed = json.dumps(
        {
            "events": [
                {"tenant_id": "mine-kid", "feature_name": "x", "quantity": 2, "transaction_id": "c"},
                {"tenant_id": "far-project", "feature_name": "x", "quantity": 2, "transaction_id": "d"},
                {"tenant_id": "org", "feature_name": "x", "quantity": 2, "transaction_id": "e"},
            ]
        }
    )
    refused = post(world["key"], mixed)
    assert refused.status_code == 422
    assert set(refused.json()["error"]["details"]) == {"1", "2"}  # another tree and an ancestor: both unknown


def test_a_tenant_id_parameter_takes_the_same_time_for_a_tenant_of_another_tree_as_for_an_unknown_id(world):
    """``tenant_in_scope`` (``/usage``, ``/entitlements``, ``/quotas``): it read the named row whatever its tree, so a
    foreign id cost a row more than an unknown one (+12% of the lookup on SQLite and PostgreSQL, medians of 1,500);
    the subtree is now part of the query and neither is read."""
    key = authenticate_key(world["key"])
    principal = TenantPrincipal(api_key=key, tenant=key.tenant)

    def look_up(tenant_id: str) -> None:
        with pytest.raises(ApiError):
            tenant_in_scope(principal, tenant_id)

    medians = interleaved_medians(look_up, ["far-project", "nobody"], 1500)
    assert ratio(medians) < 1.06, medians
