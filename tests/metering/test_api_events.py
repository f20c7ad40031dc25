"""``POST /api/v1/events``: the contract, every bad input, all-or-nothing batches and per-index duplicates."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from metering.adapters.database import DatabaseMeteringAdapter
from metering.models import UsageRecord
from quotas.handler import QuotaPolicyHandler
from tenants.exceptions import InactiveTenant
from tenants.lineage import invalidate
from tenants.models import Tenant
from tests.api_helpers import DROP, error_of, event
from tests.factories import any_backdate, record, usage
from tests.quota_helpers import limit

pytest_plugins = ["tests.api_fixtures"]

URL = "/api/v1/events"


def stored() -> int:
    return UsageRecord.objects.count()


# ---- the happy paths ----


def test_one_event_is_stored_and_counted_up_the_tree(api):
    response = api.post(URL, event(quantity="12.5", metadata={"model": "x"}))
    assert response.status_code == 201, response.content
    assert response.json() == {
        "created": 1,
        "duplicates": 0,
        "results": [{"index": 0, "status": "created", "tenant_id": "acme-chat-key-1", "transaction_id": "tx-1"}],
    }
    fact = UsageRecord.objects.get()
    assert fact.metadata == {"model": "x"}
    assert usage("acme-chat-key-1") == Decimal("12.5")
    assert usage("acme") == Decimal("12.5")


def test_a_batch_is_stored_in_order(api):
    events = [event(transaction_id=f"tx-{i}", quantity=i + 1) for i in range(3)]
    response = api.post(URL, {"events": events})
    assert response.status_code == 201
    assert [result["status"] for result in response.json()["results"]] == ["created"] * 3
    assert usage("acme-chat") == Decimal(6)


def test_tenant_id_defaults_to_the_keys_own_tenant(api):
    response = api.post(URL, event(tenant_id=DROP))
    assert response.status_code == 201
    assert response.json()["results"][0]["tenant_id"] == "acme-chat"
    assert usage("acme-chat") == Decimal(10) and usage("acme-chat-key-1") == 0


def test_an_org_key_writes_anywhere_in_its_subtree(api):
    batch = [event(tenant_id=tenant, transaction_id=tenant) for tenant in ("acme", "acme-chat", "acme-search-key-1")]
    response = api.post(URL, {"events": batch}, key="org")
    assert response.status_code == 201
    assert usage("acme") == Decimal(30)


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("12.5", "12.5"), (12.5, "12.5"), (0.1, "0.1"), (7, "7"), ("0.000001", "0.000001"), ("0", "0"), ("007", "7")],
)
def test_quantities_are_exact(api, quantity, expected):
    assert api.post(URL, event(quantity=quantity)).status_code == 201
    assert usage("acme-chat-key-1") == Decimal(expected)


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2025-01-31T12:00:00Z", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        ("2025-01-31T14:00:00+02:00", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        ("2025-01-31T12:00:00.250000+00:00", datetime(2025, 1, 31, 12, 0, 0, 250000, tzinfo=UTC)),
        (1738324800, datetime(2025, 1, 31, 12, tzinfo=UTC)),
        (1738324800.5, datetime(2025, 1, 31, 12, 0, 0, 500000, tzinfo=UTC)),
    ],
)
@any_backdate()
def test_timestamps_iso_8601_with_offset_or_unix_seconds(api, timestamp, expected):
    assert api.post(URL, event(timestamp=timestamp)).status_code == 201
    assert UsageRecord.objects.get().timestamp == expected


def test_timestamp_defaults_to_now(api):
    before = datetime.now(UTC)
    assert api.post(URL, event()).status_code == 201
    assert before <= UsageRecord.objects.get().timestamp <= datetime.now(UTC)


# ---- duplicates are reported, not failed ----


def test_an_already_recorded_transaction_id_is_a_duplicate(api):
    record("acme-chat-key-1", 5, transaction_id="tx-1")
    response = api.post(URL, {"events": [event(), event(transaction_id="tx-2")]})
    assert response.status_code == 201
    assert [result["status"] for result in response.json()["results"]] == ["duplicate", "created"]
    assert response.json()["duplicates"] == 1
    assert usage("acme-chat-key-1") == Decimal(15)


def test_all_duplicates_answer_200(api):
    assert api.post(URL, event()).status_code == 201
    again = api.post(URL, event())
    assert again.status_code == 200
    assert again.json()["created"] == 0 and again.json()["results"][0]["status"] == "duplicate"
    assert stored() == 1


def test_a_transaction_id_repeated_within_a_batch_is_stored_once(api):
    batch = [event(), event(quantity="99"), event(tenant_id="acme-chat-key-2")]
    response = api.post(URL, {"events": batch})
    assert [result["status"] for result in response.json()["results"]] == ["created", "duplicate", "created"]
    assert usage("acme-chat-key-1") == Decimal(10)  # the first one wins
    assert usage("acme-chat-key-2") == Decimal(10)  # same transaction id, other tenant: its own fact


# ---- all or nothing ----


def test_one_invalid_event_stores_nothing_and_names_its_index(api):
    batch = [event(transaction_id=f"tx-{i}") for i in range(5)]
    batch[3]["quantity"] = "NaN"
    response = api.post(URL, {"events": batch})
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "validation_errors"
    assert error["field"] == "events"
    assert error["details"] == {"3": {"quantity": ["invalid_quantity"]}}
    assert "finite" in error["messages"]["3"]["quantity"][0]
    assert stored() == 0


def test_every_bad_event_and_every_bad_field_is_reported(api):
    batch = [
        event(transaction_id="a", quantity=-1, feature_name="bad name"),
        event(transaction_id="b"),
        "not an object",
        event(transaction_id="c", tenant_id="nope"),
    ]
    error = error_of(api.post(URL, {"events": batch}))
    assert error["details"] == {
        "0": {"feature_name": ["invalid_feature_name"], "quantity": ["invalid_quantity"]},
        "2": {"event": ["invalid_event"]},
        "3": {"tenant_id": ["unknown_tenant"]},
    }


def test_a_failure_while_recording_rolls_back_the_whole_batch(api, monkeypatch):
    calls = []
    original = DatabaseMeteringAdapter.record_fact

    def flaky(self, event, **kwargs):
        calls.append(event.transaction_id)
        if len(calls) == 3:
            raise InactiveTenant("deactivated meanwhile")
        return original(self, event, **kwargs)

    monkeypatch.setattr(DatabaseMeteringAdapter, "record_fact", flaky)
    batch = [event(transaction_id=f"tx-{i}") for i in range(4)]
    response = api.post(URL, {"events": batch})
    assert response.status_code == 422
    assert error_of(response)["details"] == {"2": {"tenant_id": ["inactive_tenant"]}}
    assert stored() == 0
    assert usage("acme") == 0


@pytest.mark.redis
def test_a_rolled_back_batch_leaves_no_redis_over_count(api, monkeypatch, redis_cache):
    record("acme-chat-key-1", 5, transaction_id="before")
    assert usage("acme") == Decimal(5)  # builds the live counters
    original = DatabaseMeteringAdapter.record_fact

    def failing_last(self, event, **kwargs):
        if event.transaction_id == "tx-2":
            raise InactiveTenant("deactivated meanwhile")
        return original(self, event, **kwargs)

    monkeypatch.setattr(DatabaseMeteringAdapter, "record_fact", failing_last)
    response = api.post(URL, {"events": [event(transaction_id=f"tx-{i}") for i in range(3)]})
    assert response.status_code == 422
    assert usage("acme") == Decimal(5)
    assert usage("acme-chat-key-1") == Decimal(5)


def test_recording_goes_through_the_adapter_so_outboxes_see_every_fact(api, settings):
    settings.METERING = {**settings.METERING, "ADAPTER": "tests.metering.test_api_events.SpyAdapter"}
    SpyAdapter.seen.clear()
    api.post(URL, {"events": [event(transaction_id="a"), event(transaction_id="b")]})
    assert SpyAdapter.seen == ["a", "b"]


class SpyAdapter(DatabaseMeteringAdapter):
    seen: list[str] = []

    def on_stored(self, valid, record_id, context):
        self.seen.append(valid.transaction_id)


def test_an_adapter_that_stores_nowhere_local_is_refused_cleanly(api, settings):
    settings.METERING = {**settings.METERING, "ADAPTER": "tests.metering.test_api_events.RemoteOnlyAdapter"}
    response = api.post(URL, event())
    assert response.status_code == 503
    assert error_of(response)["code"] == "unsupported_adapter"


class RemoteOnlyAdapter:
    async def record_usage(self, event):  # pragma: no cover
        pass

    async def get_usage(self, tenant_id, feature_name, start_time, end_time):  # pragma: no cover
        return Decimal(0)

    def record_usage_sync(self, event):  # pragma: no cover
        pass

    def get_usage_sync(self, tenant_id, feature_name, start_time, end_time):  # pragma: no cover
        return Decimal(0)


def test_ingestion_is_not_quota_enforced(api):
    limit("acme-chat", 0)
    assert QuotaPolicyHandler("acme-chat-key-1").check("llm_tokens", 1).allowed is False
    assert api.post(URL, event(quantity=50)).status_code == 201
    assert usage("acme-chat") == Decimal(50)


def test_a_1000_event_batch_is_accepted(api):
    batch = [event(transaction_id=f"tx-{i}", quantity=1) for i in range(1000)]
    response = api.post(URL, {"events": batch})
    assert response.status_code == 201
    assert response.json()["created"] == 1000
    assert usage("acme") == Decimal(1000)


# ---- bad input, field by field ----

FUTURE = (datetime.now(UTC) + timedelta(hours=2)).isoformat()

BAD_FIELDS = [
    ("quantity", "NaN", "invalid_quantity"),
    ("quantity", "Infinity", "invalid_quantity"),
    ("quantity", "-inf", "invalid_quantity"),
    ("quantity", -1, "invalid_quantity"),
    ("quantity", "-0.5", "invalid_quantity"),
    ("quantity", "abc", "invalid_quantity"),
    ("quantity", "", "invalid_quantity"),
    ("quantity", "1e3x", "invalid_quantity"),
    ("quantity", True, "invalid_quantity"),
    ("quantity", [1], "invalid_quantity"),
    ("quantity", {"value": 1}, "invalid_quantity"),
    ("quantity", "1.0000001", "invalid_quantity"),
    ("quantity", " 3 ", "invalid_quantity"),  # the schema's pattern has no whitespace: neither has the server
    ("quantity", "0" * 20 + "1", "invalid_quantity"),  # longer than the schema's maxLength
    ("quantity", 10**13, "invalid_quantity"),
    ("quantity", DROP, "required"),
    ("quantity", None, "required"),
    ("feature_name", "", "invalid_feature_name"),
    ("feature_name", "has space", "invalid_feature_name"),
    ("feature_name", "tökens", "invalid_feature_name"),
    ("feature_name", "a/b", "invalid_feature_name"),
    ("feature_name", "-leading", "invalid_feature_name"),
    ("feature_name", "x" * 101, "invalid_feature_name"),
    ("feature_name", 5, "invalid_feature_name"),
    ("feature_name", DROP, "required"),
    ("timestamp", "2025-01-31T12:00:00", "invalid_timestamp"),
    ("timestamp", "2025-01-31", "invalid_timestamp"),
    ("timestamp", "yesterday", "invalid_timestamp"),
    ("timestamp", FUTURE, "timestamp_out_of_range"),  # METERING["MAX_FUTURE"]
    ("timestamp", True, "invalid_timestamp"),
    ("timestamp", [2025], "invalid_timestamp"),
    ("timestamp", 10**20, "invalid_timestamp"),
    ("timestamp", "1738324800", "invalid_timestamp"),
    ("metadata", [], "invalid_metadata"),
    ("metadata", "text", "invalid_metadata"),
    ("metadata", {"blob": "x" * 5000}, "invalid_metadata"),
    ("transaction_id", DROP, "required"),
    ("transaction_id", "", "invalid_transaction_id"),
    ("transaction_id", "has space", "invalid_transaction_id"),
    ("transaction_id", "é", "invalid_transaction_id"),
    ("transaction_id", 123, "invalid_transaction_id"),
    ("transaction_id", "x" * 129, "invalid_transaction_id"),
    ("tenant_id", 5, "invalid_tenant_id"),
    ("tenant_id", "", "invalid_tenant_id"),
    ("tenant_id", "x" * 129, "invalid_tenant_id"),
    ("tenant_id", "no-such-tenant", "unknown_tenant"),
    ("quantiy", "1", "unknown_field"),
]


@pytest.mark.parametrize(("field", "value", "code"), BAD_FIELDS)
def test_each_bad_field_is_a_422_naming_field_and_code(api, field, value, code):
    bad = event(**{"transaction_id": "bad", field: value})
    response = api.post(URL, {"events": [event(transaction_id="ok"), bad]})
    assert response.status_code == 422, response.content
    assert error_of(response)["details"] == {"1": {field: [code]}}
    assert stored() == 0


def test_a_single_bad_event_is_reported_at_index_0(api):
    error = error_of(api.post(URL, event(quantity="NaN")))
    assert error["details"] == {"0": {"quantity": ["invalid_quantity"]}}


def test_an_inactive_tenant_in_the_subtree_is_named(api):
    Tenant.objects.filter(external_id="acme-chat-key-2").update(is_active=False)
    invalidate(["acme-chat-key-2"])
    error = error_of(api.post(URL, event(tenant_id="acme-chat-key-2")))
    assert error["details"] == {"0": {"tenant_id": ["inactive_tenant"]}}


# ---- bad bodies ----


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        ('{"feature_name": "x",', "invalid_json", "body"),
        ("{'single': 'quotes'}", "invalid_json", "body"),
        ('{"quantity": NaN}', "invalid_json", "body"),
        ('{"quantity": Infinity}', "invalid_json", "body"),
        ("[]", "invalid_body", "body"),
        ('"text"', "invalid_body", "body"),
        ("42", "invalid_body", "body"),
        ("null", "invalid_body", "body"),
        ("{}", "invalid_body", "body"),
        ("", "invalid_body", "body"),
        ('{"events": {}}', "invalid_events", "events"),
        ('{"events": "x"}', "invalid_events", "events"),
        ('{"events": null}', "invalid_events", "events"),
        ('{"events": []}', "empty_batch", "events"),
        ('{"events": [], "extra": 1}', "unknown_field", "extra"),
    ],
)
def test_bad_bodies_are_400_json(api, raw, code, field):
    response = api.post(URL, raw=raw)
    assert response.status_code == 400, response.content
    error = error_of(response)
    assert (error["code"], error["field"]) == (code, field)
    assert stored() == 0


def test_more_than_1000_events_are_refused(api):
    response = api.post(URL, {"events": [event(transaction_id=f"tx-{i}") for i in range(1001)]})
    assert response.status_code == 400
    assert (error_of(response)["code"], error_of(response)["field"]) == ("too_many_events", "events")
    assert stored() == 0


def test_a_body_that_is_not_json_is_415(api):
    response = api.client.post(URL, "quantity=1", content_type="text/plain", headers=api.headers("project"))
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"


def test_a_huge_body_is_413(api):
    huge = json.dumps({"events": [event(transaction_id=f"t{i}", metadata={"p": "x" * 4000}) for i in range(2100)]})
    response = api.post(URL, raw=huge)
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"


@pytest.mark.parametrize("method", ["get", "put", "patch", "delete"])
def test_other_methods_are_405_json(api, method):
    response = getattr(api.client, method)(URL, headers=api.headers("project"))
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"


def test_a_full_batch_with_the_largest_metadata_fits(api):
    from metering.conf import metering_settings

    blob = {"p": "x" * (metering_settings.MAX_METADATA_BYTES - len('{"p":""}'))}  # exactly the bound, encoded
    batch = [event(transaction_id=f"tx-{i}", quantity=1, metadata=blob) for i in range(1000)]
    response = api.post(URL, {"events": batch})
    assert response.status_code == 201, response.content[:300]
    assert UsageRecord.objects.filter(metadata=blob).count() == 1000


@pytest.mark.django_db(transaction=True)
def test_overlapping_batches_in_opposite_orders_all_succeed_without_a_deadlock(on_postgres):
    """Batches that touch the same rollup rows in different orders are written in one global order: concurrent
    writers queue on the rows instead of deadlocking (which would answer 503 with both stores up)."""
    import threading

    from django.db import connections
    from django.test import Client

    from tenants.apikeys import create_api_key
    from tests.factories import FOREST, tree

    tree(FOREST)
    key = create_api_key("acme", name="org")[1]
    tenants = ["acme-chat-key-1", "acme-chat-key-2", "acme-search-key-1", "acme-chat", "acme-search"]
    features = ["llm_tokens", "api_calls", "storage"]
    statuses: list[int] = []

    def batch(seed: int) -> None:
        pairs = [(tenant, feature) for tenant in tenants for feature in features]
        pairs = pairs if seed % 2 == 0 else pairs[::-1]
        events = [
            {
                "tenant_id": tenant,
                "feature_name": feature,
                "quantity": 1,
                "transaction_id": f"b{seed}-{tenant}-{feature}",
            }
            for tenant, feature in pairs
        ]
        try:
            for _ in range(3):
                response = Client().post(
                    "/api/v1/events",
                    {"events": events},
                    content_type="application/json",
                    headers={"Authorization": f"Bearer {key}"},
                )
                statuses.append(response.status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=batch, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses.count(201) == 6 and statuses.count(200) == 12, statuses  # created once, then duplicates
    assert UsageRecord.objects.count() == 6 * len(tenants) * len(features)
