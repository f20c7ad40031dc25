"""Attack on the feature bound: one key below the root must not spend its whole tree's budget of distinct features.

``MAX_FEATURES_PER_TREE`` (1,000) bounds a tree; before ``MAX_FEATURES_PER_KEY`` a key-level tenant spent all of it
in one 1,000-event request of junk names, after which no tenant of the organization — the org itself through
Python, a sibling through the API — could record any feature new to the tree, ever (facts are never deleted): a
denial of service on everyone above and beside the caller. Now a key below its tree's root may bring new features
into the tree only while its subtree holds fewer than ``MAX_FEATURES_PER_KEY`` (100) distinct features; features the
tree already has stay free for everyone, and a root's key is bound by the tree's budget only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client, override_settings

from metering import UsageEvent, get_meter
from metering.models import UsageRollup
from metering.recorder import forget_known_features
from tenants.apikeys import create_api_key
from tests.factories import tree

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _no_known_features() -> Iterator[None]:
    forget_known_features()
    yield
    forget_known_features()


@pytest.fixture
def keys() -> dict[str, str]:
    tree({"org": None, "proj": "org", "me": "proj", "twin": "proj"})
    return {tenant_id: create_api_key(tenant_id)[1] for tenant_id in ("org", "proj", "me", "twin")}


def post(key: str, names: list[str], prefix: str) -> Any:
    events = [{"feature_name": name, "quantity": 1, "transaction_id": f"{prefix}{i}"} for i, name in enumerate(names)]
    body = json.dumps({"events": events})
    return Client().post(
        "/api/v1/events", body, content_type="application/json", headers={"Authorization": f"Bearer {key}"}
    )


def tree_features() -> set[str]:
    return set(UsageRollup.objects.filter(tenant__external_id="org").values_list("feature", flat=True))


def test_a_key_level_tenant_cannot_spend_the_trees_feature_budget(keys):
    junk = [f"junk-{index}" for index in range(1000)]
    refused = post(keys["me"], junk, "j")
    assert refused.status_code == 422, refused.content[:300]
    error = refused.json()["error"]
    [(index, details)] = error["details"].items()  # the first name past the budget, as the tree's bound reports
    assert details == {"feature_name": ["too_many_features"]}
    assert "MAX_FEATURES_PER_KEY" in error["messages"][index]["feature_name"][0]
    assert tree_features() == set()  # all or nothing
    assert post(keys["me"], junk[:100], "k").status_code == 201  # exactly the key's budget
    assert post(keys["me"], ["junk-100"], "l").status_code == 422
    # The rest of the organization is untouched: a sibling, the org itself (Python), a root key.
    assert post(keys["twin"], ["images"], "t").status_code == 201
    get_meter().record_usage_sync(UsageEvent("org", "video", 1))
    assert post(keys["org"], [f"org-{index}" for index in range(150)], "o").status_code == 201
    assert len(tree_features()) == 100 + 2 + 150


def test_features_the_tree_has_stay_free_for_a_key_over_its_budget(keys):
    known = [f"product-{index}" for index in range(120)]
    assert post(keys["org"], known, "o").status_code == 201
    assert post(keys["me"], known, "m").status_code == 201  # 120 > 100, but none is new to the tree
    assert post(keys["me"], ["brand-new"], "n").status_code == 422
    assert post(keys["proj"], ["brand-new"], "p").status_code == 422  # proj's subtree holds me's 120 too
    assert post(keys["twin"], ["brand-new"], "t").status_code == 201


@override_settings(METERING={"MAX_FEATURES_PER_KEY": None})
def test_none_leaves_only_the_tree_bound(keys):
    assert post(keys["me"], [f"f-{index}" for index in range(300)], "a").status_code == 201


@pytest.mark.parametrize("value", [0, -1, "100", True, 1.5])
def test_an_invalid_budget_is_a_system_check_error(value):
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    with override_settings(METERING={"MAX_FEATURES_PER_KEY": value}), pytest.raises(SystemCheckError, match="E035"):
        call_command("check")
