"""Reconciliation works day by day: differences on any day, stray rows on days without facts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from metering.models import UsageRollup
from metering.rollups import reconcile_tree
from tenants.models import Tenant
from tests.factories import any_backdate, record, tree, usage

pytestmark = pytest.mark.django_db(transaction=True)  # reconcile_tree commits one day at a time


@any_backdate()
def test_differences_on_several_days_are_found_and_repaired():
    tree({"org": None, "p1": "org", "k1": "p1"})
    start = datetime(2026, 3, 1, 10, tzinfo=UTC)
    for day in range(3):
        record("k1", day + 1, timestamp=start + timedelta(days=day))
    org = Tenant.objects.get(external_id="org")
    UsageRollup.objects.filter(tenant=org, bucket=start + timedelta(days=1)).update(units=999)
    UsageRollup.objects.create(tenant=org, feature="llm_tokens", bucket=start + timedelta(days=7), units=5, events=1)
    found = reconcile_tree(org, repair=True)
    assert sorted((d.bucket, d.stored_units, d.expected_units) for d in found) == [
        (start + timedelta(days=1), 999, 2_000_000),
        (start + timedelta(days=7), 5, 0),
    ]
    assert usage("org") == 6
    assert reconcile_tree(org, repair=False) == []
