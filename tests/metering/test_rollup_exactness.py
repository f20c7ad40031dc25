"""Random facts over a random tree: every tenant's usage equals the sum of its subtree's facts, also after moves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.cache import caches
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metering.windows import window
from tenants.lineage import get_context, invalidate
from tenants.models import Tenant
from tenants.tree import create_tenant, move_tenant
from tests.factories import any_backdate, record, usage

START = datetime(2026, 4, 28, 0, 0, tzinfo=UTC)
quantities = st.decimals(min_value=0, max_value=10_000, places=6, allow_nan=False, allow_infinity=False)
facts = st.lists(
    st.tuples(
        st.integers(0, 11), st.sampled_from(["llm_tokens", "api_calls"]), quantities, st.integers(0, 6 * 24 * 60)
    ),
    min_size=1,
    max_size=40,
)
parents = st.lists(st.integers(0, 10), min_size=11, max_size=11)
moves = st.lists(st.tuples(st.integers(1, 11), st.integers(0, 11)), max_size=3)


def build_tree(parent_choices: list[int]) -> list[str]:
    ids = ["t0"]
    create_tenant("t0")
    for index, choice in enumerate(parent_choices, start=1):
        tenant_id = f"t{index}"
        create_tenant(tenant_id, parent=ids[choice % index])
        ids.append(tenant_id)
    return ids


def subtree_of(tenant_id: str) -> set[str]:
    path = Tenant.objects.get(external_id=tenant_id).path
    return set(Tenant.objects.filter(path__startswith=path).values_list("external_id", flat=True))


@pytest.mark.django_db
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parent_choices=parents, fact_list=facts, move_list=moves)
@any_backdate()
def test_every_tenants_usage_is_the_sum_of_its_subtrees_facts(parent_choices, fact_list, move_list):
    # Each example runs in a savepoint rolled back at its end, so examples never see each other's rows.
    with transaction.atomic():
        check_example(parent_choices, fact_list, move_list)
        transaction.set_rollback(True)
    for cache in caches.all(initialized_only=True):
        cache.clear()


def check_example(parent_choices, fact_list, move_list):
    ids = build_tree(parent_choices)
    recorded: list[tuple[str, str, Decimal, datetime]] = []
    for index, feature, quantity, minute in fact_list:
        moment = START + timedelta(minutes=minute)
        record(ids[index], quantity, feature=feature, timestamp=moment)
        recorded.append((ids[index], feature, quantity, moment))
    for child, parent in move_list:
        try:
            move_tenant(ids[child], ids[parent])
        except ValueError:
            continue  # a cycle: refused, nothing changed
        invalidate(ids)  # the test runs in one transaction, so the on-commit invalidation does not run

    windows = [(None, None), window("month", START), window("day", START + timedelta(days=2))]
    windows.append((START + timedelta(hours=5, minutes=17), START + timedelta(days=3, minutes=5)))
    for tenant_id in ids:
        members = subtree_of(tenant_id)
        for feature in ("llm_tokens", "api_calls"):
            for start, end in windows:
                expected = sum(
                    (
                        quantity
                        for owner, fact_feature, quantity, moment in recorded
                        if owner in members
                        and fact_feature == feature
                        and (start is None or moment >= start)
                        and (end is None or moment < end)
                    ),
                    Decimal(0),
                )
                assert usage(tenant_id, feature, start, end) == expected, (tenant_id, feature, start, end)
        assert get_context(tenant_id).tenant_id == tenant_id
