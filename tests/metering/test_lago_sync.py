"""``manage.py lago_sync`` (issue 12 item 5) against the fake Lago: customers, subscriptions and billable metrics
created idempotently, ids written back, ``--dry-run`` changing nothing, a plan mismatch reported and left alone."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from metering.delivery.deliver import flush
from tenants.models import Tenant
from tests.lago_support import record

pytest_plugins = ["tests.lago_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


def run(*args: str) -> str:
    out = StringIO()
    call_command("lago_sync", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def metrics(lago_settings, settings):
    settings.METERING = {**settings.METERING, "LAGO_METRICS": {"llm_tokens": {"code": "tokens", "property": "n"}}}
    return lago_settings


def test_dry_run_prints_the_plan_and_changes_nothing(metrics, org):
    text = run("--plan", "starter", "--dry-run")
    assert text.splitlines() == [
        "would create billable metric tokens (sum_agg over n)",
        "would create customer org",
        "would create subscription sub-org of org on plan starter",
        "would create customer other",
        "would create subscription other of other on plan starter",
        "would set lago_subscription_id of other to other",
        "6 to change, 0 unchanged",
    ]
    assert metrics.customers == {} and metrics.subscriptions == {} and metrics.billable_metrics == {}
    assert Tenant.objects.get(external_id="other").lago_subscription_id == ""


def test_sync_creates_everything_once_writes_ids_back_and_facts_then_bill(metrics, org):
    record("key1", 3, transaction_id="a", feature="images")  # a recorded feature gets a metric too
    run("--plan", "starter")
    assert metrics.billable_metrics["tokens"] == {
        "name": "llm_tokens",
        "code": "tokens",
        "aggregation_type": "sum_agg",
        "field_name": "n",
    }
    assert metrics.billable_metrics["images"]["field_name"] == "quantity"
    assert set(metrics.customers) == {"org", "other"}
    assert {key: value["plan_code"] for key, value in metrics.subscriptions.items()} == {
        "sub-org": "starter",
        "other": "starter",
    }
    assert metrics.subscriptions["other"]["external_customer_id"] == "other"
    assert Tenant.objects.get(external_id="other").lago_subscription_id == "other"
    writes = sum(metrics.writes.values())
    assert run("--plan", "starter").splitlines()[-1] == "0 changed, 6 unchanged"  # idempotent
    assert sum(metrics.writes.values()) == writes  # the second run wrote nothing
    record("other", 2, transaction_id="b")
    flush()
    assert {e["transaction_id"]: e["external_subscription_id"] for e in metrics.events()}["other/b"] == "other"


def test_a_changed_metric_is_updated_and_another_plan_is_left_alone_with_a_warning(metrics, org, settings):
    run("--plan", "starter", "org")
    settings.METERING = {**settings.METERING, "LAGO_METRICS": {"llm_tokens": {"code": "tokens", "property": "t"}}}
    text = run("--plan", "pro", "org")
    assert "update billable metric tokens (sum_agg over t) (was sum_agg over n)" in text
    assert "WARNING: subscription sub-org of org on plan pro: Lago has it on plan starter; left alone" in text
    assert metrics.subscriptions["sub-org"]["plan_code"] == "starter"
    assert metrics.billable_metrics["tokens"]["field_name"] == "t"


def test_refusals_and_unknown_tenants_are_command_errors(metrics, org):
    with pytest.raises(CommandError, match="unknown tenants: nope"):
        run("--plan", "starter", "nope")
    metrics.keys = {}
    with pytest.raises(CommandError, match="Lago refused or did not answer: GET /api/v1/billable_metrics/tokens: 401"):
        run("--plan", "starter")
