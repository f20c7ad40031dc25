"""What one key (one tree) may write: distinct features, the timestamp window, events per request, requests per key.

Each bound at its limit and one past it, through Python and HTTP; a refusal is a named ``InvalidUsageEvent`` (a 4xx
naming the field over HTTP) and writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from metering import UsageEvent, get_meter
from metering.exceptions import InvalidFeatureName, InvalidTimestamp, TimestampOutOfRange, TooManyFeatures
from metering.models import UsageRecord, UsageRollup
from metering.recorder import forget_known_features
from quotas.handler import QuotaPolicyHandler
from quotas.models import QuotaReservation
from tests.api_helpers import error_of, event
from tests.factories import tree
from tests.metering.test_concurrency import run_in_threads
from tests.modes import FEATURE_BOUND

pytest_plugins = ["tests.api_fixtures"]

URL = "/api/v1/events"


@pytest.fixture(autouse=True)
def _no_known_features() -> Iterator[None]:
    # Test databases reuse primary keys: a (tree, feature) pair remembered by one test must not vouch for another's.
    forget_known_features()
    yield
    forget_known_features()


def metering(**values: Any) -> Any:
    from django.conf import settings

    return override_settings(METERING={**getattr(settings, "METERING", {}), **values})


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def facts() -> int:
    return UsageRecord.objects.count()


def rollup_features(tenant_id: str = "acme") -> set[str]:
    return set(UsageRollup.objects.filter(tenant__external_id=tenant_id).values_list("feature", flat=True))


def batch(features: list[str], prefix: str = "t") -> dict[str, Any]:
    return {
        "events": [
            event(feature_name=name, transaction_id=f"{prefix}{index}", timestamp=iso(datetime.now(UTC)))
            for index, name in enumerate(features)
        ]
    }


# ---- distinct features per tree ----


def test_the_thousandth_feature_is_accepted_and_the_next_refused_by_default(api):
    # The root's key: a key below it may bring only MAX_FEATURES_PER_KEY new features (test_attack_feature_budget).
    response = api.post(URL, batch([f"f{index}" for index in range(999)]), key="org")
    assert response.status_code == 201, response.content
    meter = get_meter()
    meter.record_usage_sync(UsageEvent("acme-chat-key-1", "f999", 1))  # the 1,000th distinct feature of acme's tree
    with pytest.raises(TooManyFeatures) as refused:
        meter.record_usage_sync(UsageEvent("acme-chat-key-2", "f1000", 1))
    assert (refused.value.code, refused.value.field) == ("too_many_features", "feature_name")
    assert isinstance(refused.value, InvalidFeatureName)
    assert len(rollup_features()) == 1000 and facts() == 1000
    # Features the tree has are still accepted, and another tree has its own room.
    meter.record_usage_sync(UsageEvent("acme-search-key-1", "f7", 1))
    meter.record_usage_sync(UsageEvent("other-project", "f1000", 1))
    assert facts() == 1002


@metering(MAX_FEATURES_PER_TREE=3)
def test_over_http_one_new_feature_too_many_refuses_the_whole_batch(api):
    assert api.post(URL, batch(["a", "b"], "x")).status_code == 201
    response = api.post(URL, batch(["a", "c", "d", "b"], "y"))  # c would be the 3rd, d the 4th
    assert response.status_code == 422, response.content
    error = error_of(response)
    assert error["code"] == "validation_errors"
    assert error["details"] == {"2": {"feature_name": ["too_many_features"]}}
    assert facts() == 2 and rollup_features() == {"a", "b"}  # nothing of the batch was written
    response = api.post(URL, batch(["a", "c", "b"], "z"))  # exactly the 3rd: accepted
    assert response.status_code == 201, response.content
    single = api.post(URL, event(feature_name="e", transaction_id="w"), key="child")
    assert single.status_code == 422
    assert error_of(single)["details"] == {"0": {"feature_name": ["too_many_features"]}}
    assert facts() == 5


@metering(MAX_FEATURES_PER_TREE=2)
def test_quota_consumption_is_bound_too(forest):
    QuotaPolicyHandler("acme-chat").consume("a", 1)
    QuotaPolicyHandler("acme-search").consume("b", 1)
    with pytest.raises(TooManyFeatures):
        QuotaPolicyHandler("acme-chat-key-1").consume("c", 1)
    assert facts() == 2 and rollup_features() == {"a", "b"}
    assert QuotaPolicyHandler("acme-chat-key-1").consume("a", 1).allowed
    reservation = QuotaPolicyHandler("acme").reserve("b", 5)
    reservation.commit(2)
    assert facts() == 4
    assert not QuotaReservation.objects.filter(state=QuotaReservation.State.ACTIVE).exists()


@metering(MAX_FEATURES_PER_TREE=None)
def test_none_is_unbounded(forest):
    for index in range(5):
        get_meter().record_usage_sync(UsageEvent("acme", f"g{index}", 1))
    assert len(rollup_features()) == 5


@pytest.mark.django_db(transaction=True)
@pytest.mark.commit_mode(FEATURE_BOUND)
def test_a_feature_the_tree_has_costs_no_query(django_db_setup):
    tree({"solo": None, "solo-key": "solo"})
    meter = get_meter()
    meter.record_usage_sync(UsageEvent("solo-key", "llm_tokens", 1))  # committed: now known to this process
    with CaptureQueriesContext(connection) as bounded:
        meter.record_usage_sync(UsageEvent("solo-key", "llm_tokens", 1))
    with metering(MAX_FEATURES_PER_TREE=None), CaptureQueriesContext(connection) as unbounded:
        meter.record_usage_sync(UsageEvent("solo-key", "llm_tokens", 1))
    assert len(bounded) == len(unbounded)
    forget_known_features()  # a restarted process: one indexed look-up, then known again
    with CaptureQueriesContext(connection) as cold:
        meter.record_usage_sync(UsageEvent("solo-key", "llm_tokens", 1))
    assert len(cold) == len(unbounded) + 1
    assert facts() == 4


@pytest.mark.django_db(transaction=True)
@pytest.mark.commit_mode(FEATURE_BOUND)
def test_two_writers_introducing_the_last_feature_and_one_more_never_both_pass(django_db_setup, on_postgres):
    limit = 3
    with metering(MAX_FEATURES_PER_TREE=limit):
        for round_ in range(6):
            root = f"race{round_}"
            tree({root: None, f"{root}-a": root, f"{root}-b": root})
            meter = get_meter()
            meter.record_usage_sync(UsageEvent(root, "old1", 1))
            meter.record_usage_sync(UsageEvent(root, "old2", 1))
            forget_known_features()
            outcomes: dict[int, str] = {}

            def write(index: int, root: str = root, outcomes: dict[int, str] = outcomes) -> None:
                try:
                    get_meter().record_usage_sync(UsageEvent(f"{root}-{'ab'[index]}", f"new{index}", 1))
                except TooManyFeatures:
                    outcomes[index] = "refused"
                else:
                    outcomes[index] = "stored"

            assert run_in_threads(2, write) == []
            assert sorted(outcomes.values()) == ["refused", "stored"], (round_, outcomes)
            assert len(rollup_features(root)) == limit


@metering(FEATURES={"llm_tokens", "api_calls"})
def test_the_allowlist_refuses_other_names_through_python_and_http(api):
    meter = get_meter()
    meter.record_usage_sync(UsageEvent("acme-chat", "api_calls", 1))
    with pytest.raises(InvalidFeatureName) as refused:
        meter.record_usage_sync(UsageEvent("acme-chat", "gpu_seconds", 1))
    assert (refused.value.code, refused.value.field) == ("unknown_feature", "feature_name")
    with pytest.raises(InvalidFeatureName):
        QuotaPolicyHandler("acme-chat").consume("gpu_seconds", 1)
    with pytest.raises(InvalidFeatureName):  # refused when reserved, not when the work is done and committed
        QuotaPolicyHandler("acme-chat").reserve("gpu_seconds", 1)
    assert not QuotaReservation.objects.exists()
    response = api.post(URL, batch(["llm_tokens", "gpu_seconds"]))
    assert response.status_code == 422
    assert error_of(response)["details"] == {"1": {"feature_name": ["unknown_feature"]}}
    assert api.post(URL, batch(["llm_tokens"])).status_code == 201
    assert facts() == 2


# ---- the timestamp window ----


@pytest.mark.parametrize(
    ("setting", "offset", "accepted"),
    [
        ({}, -timedelta(days=35) + timedelta(seconds=1), True),
        ({}, -timedelta(days=35) - timedelta(seconds=1), False),
        ({}, timedelta(minutes=5) - timedelta(seconds=1), True),
        ({}, timedelta(minutes=5) + timedelta(seconds=1), False),
        ({"MAX_BACKDATE": 3600}, -timedelta(seconds=3599), True),
        ({"MAX_BACKDATE": 3600}, -timedelta(seconds=3601), False),
        ({"MAX_FUTURE": timedelta(hours=1)}, timedelta(minutes=59), True),
        ({"MAX_FUTURE": timedelta(hours=1)}, timedelta(minutes=61), False),
        ({"MAX_BACKDATE": None}, datetime(1970, 1, 1, tzinfo=UTC) - datetime.now(UTC), True),
    ],
)
def test_the_timestamp_window_through_python_and_http(api, setting, offset, accepted):
    with metering(**setting):
        moment = datetime.now(UTC) + offset
        meter = get_meter()
        if accepted:
            meter.record_usage_sync(UsageEvent("acme-chat", "llm_tokens", 1, moment))
        else:
            with pytest.raises(TimestampOutOfRange) as refused:
                meter.record_usage_sync(UsageEvent("acme-chat", "llm_tokens", 1, moment))
            assert (refused.value.code, refused.value.field) == ("timestamp_out_of_range", "timestamp")
            assert isinstance(refused.value, InvalidTimestamp)
        for timestamp in (iso(moment), moment.timestamp()):
            response = api.post(URL, event(timestamp=timestamp, transaction_id=f"tx-{timestamp}"))
            if accepted:
                assert response.status_code == 201, response.content
            else:
                assert response.status_code == 422, response.content
                assert error_of(response)["details"] == {"0": {"timestamp": ["timestamp_out_of_range"]}}
    assert facts() == (3 if accepted else 0)


def test_the_absolute_bounds_stay_when_the_window_is_unbounded(api):
    with metering(MAX_BACKDATE=None):
        with pytest.raises(InvalidTimestamp) as refused:
            get_meter().record_usage_sync(UsageEvent("acme", "llm_tokens", 1, datetime(1969, 12, 31, tzinfo=UTC)))
        assert refused.value.code == "invalid_timestamp"
        response = api.post(URL, event(timestamp="0001-01-01T00:00:00Z"))
        assert response.status_code == 422
    assert facts() == 0


# ---- events per request ----


def test_events_per_request(api):
    with metering(MAX_EVENTS_PER_REQUEST=3):
        assert api.post(URL, batch(["a", "a", "a"])).status_code == 201
        response = api.post(URL, batch(["a", "a", "a", "a"], "u"))
        assert response.status_code == 400
        error = error_of(response)
        assert (error["code"], error["field"]) == ("too_many_events", "events")
        assert "MAX_EVENTS_PER_REQUEST" in error["message"]
    assert facts() == 3
    response = api.post(URL, batch(["a"] * 1001, "v"))  # the default and largest: 1,000
    assert (response.status_code, error_of(response)["code"]) == (400, "too_many_events")
    assert facts() == 3


# ---- requests per API key ----


@metering(API_RATE="3/min")
def test_the_rate_per_key_answers_429_while_another_key_still_passes(api):
    for _ in range(3):
        assert api.get("/api/v1/usage", key="project", feature="llm_tokens").status_code == 200
    refused = api.post(URL, event(), key="project")
    assert refused.status_code == 429
    error = error_of(refused)
    assert (error["code"], error["field"]) == ("throttled", "Authorization")
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert facts() == 0  # refused before the body was read
    assert api.get("/api/v1/entitlements", key="project", feature="llm_tokens").status_code == 429  # one budget
    # Another key of the same tenant, and a key of another tree, still pass.
    assert api.post(URL, event(tenant_id="acme-chat-key-1"), key="child").status_code == 201
    assert api.get("/api/v1/usage", key="unrelated", feature="llm_tokens").status_code == 200
    # No key: 401, never a throttle that would let anyone spend a key's budget.
    assert api.get("/api/v1/usage", key=None, feature="llm_tokens").status_code == 401


@metering(API_RATE=None)
def test_no_rate_means_no_throttle(api):
    for _ in range(30):
        assert api.get("/api/v1/usage", key="project", feature="llm_tokens").status_code == 200


# ---- system checks ----


@pytest.mark.parametrize(
    ("key", "value", "check_id"),
    [
        ("MAX_FEATURES_PER_TREE", 0, "xaas_metering.E030"),
        ("MAX_FEATURES_PER_TREE", "1000", "xaas_metering.E030"),
        ("FEATURES", "llm_tokens", "xaas_metering.E031"),
        ("FEATURES", ["ok", "bad name"], "xaas_metering.E031"),
        ("MAX_BACKDATE", timedelta(0), "xaas_metering.E032"),
        ("MAX_BACKDATE", "35d", "xaas_metering.E032"),
        ("MAX_FUTURE", -1, "xaas_metering.E032"),
        ("MAX_FUTURE", float("nan"), "xaas_metering.E032"),
        ("MAX_EVENTS_PER_REQUEST", 1001, "xaas_metering.E033"),
        ("MAX_EVENTS_PER_REQUEST", 0, "xaas_metering.E033"),
        ("API_RATE", "6000/fortnight", "xaas_metering.E034"),
        ("API_RATE", "0/min", "xaas_metering.E034"),
        ("API_RATE", 6000, "xaas_metering.E034"),
    ],
)
def test_invalid_bounds_are_system_check_errors(key, value, check_id):
    with metering(**{key: value}), pytest.raises(SystemCheckError, match=check_id):
        call_command("check")


@pytest.mark.parametrize(
    "values",
    [
        {"MAX_FEATURES_PER_TREE": None, "FEATURES": None, "MAX_BACKDATE": None, "API_RATE": None},
        {"FEATURES": ["llm_tokens"], "MAX_BACKDATE": 86400, "MAX_FUTURE": 1.5, "API_RATE": "10/s"},
    ],
)
def test_valid_bounds_pass_the_checks(values):
    # Commit mode: the log run's Redis has no AOF, which log mode's own check reports (E041), rightly.
    with metering(**values, WRITE_MODE="commit"):
        call_command("check")
