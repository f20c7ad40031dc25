"""The fake Lago is only worth testing against if it is as strict as the notes say Lago is."""

from __future__ import annotations

import httpx
import pytest

from tests.lago_server import FakeLago
from tests.lago_support import API_KEY

GOOD = {
    "transaction_id": "tx-1",
    "external_subscription_id": "sub-1",
    "code": "tokens",
    "timestamp": "1651240791.123",
    "properties": {"tokens": 120, "model": "small"},
}


@pytest.fixture
def server():
    with FakeLago(API_KEY, read_only_keys=("read-only-key",)) as fake:
        yield fake


def post(server, events, key=API_KEY, path="/api/v1/events/batch", root="events"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json={root: events}, headers=headers, timeout=5)


def test_a_valid_batch_is_stored_and_echoed_with_200(server):
    response = post(server, [GOOD, {**GOOD, "transaction_id": "tx-2", "timestamp": 1651240791}])
    assert response.status_code == 200
    assert [event["transaction_id"] for event in response.json()["events"]] == ["tx-1", "tx-2"]
    assert server.stored_transaction_ids() == {"tx-1": 1, "tx-2": 1}


def test_auth_unknown_key_is_401_and_read_only_key_is_403(server):
    assert post(server, [GOOD], key=None).json() == {"status": 401, "error": "Unauthorized"}
    assert post(server, [GOOD], key="nope").status_code == 401
    forbidden = post(server, [GOOD], key="read-only-key")
    assert forbidden.status_code == 403 and forbidden.json()["error"] == "Forbidden"
    assert server.events() == []


def test_empty_and_oversized_batches_are_422_with_lago_codes(server):
    empty = post(server, [])
    assert empty.status_code == 422 and empty.json()["error_details"] == {"events": ["no_events"]}
    many = [{**GOOD, "transaction_id": f"tx-{i}"} for i in range(101)]
    too_many = post(server, many)
    assert too_many.status_code == 422 and too_many.json()["error_details"] == {"events": ["too_many_events"]}
    assert post(server, many[:100]).status_code == 200


def test_missing_events_key_is_422_no_events(server):
    # lago-api Api::V1::EventsController#batch does not `require` its root; Events::CreateBatchService answers
    # `no_events` when events_params is blank
    response = post(server, [GOOD], root="evnts")
    assert response.status_code == 422
    assert response.json()["error_details"] == {"events": ["no_events"]}
    assert post(server, None).json()["error_details"] == {"events": ["no_events"]}


def test_missing_event_key_on_the_single_endpoint_is_400(server):
    # EventsController#create_params: params.require(:event)
    response = post(server, GOOD, path="/api/v1/events", root="evnt")
    assert response.status_code == 400 and response.json()["error"].startswith("BadRequest")


def test_a_batch_is_all_or_nothing_and_errors_are_keyed_by_index(server):
    # Events::CreateBatchService#validate_events: Event model validations per index, BigDecimal(timestamp.to_s)
    bad = [
        GOOD,
        {**GOOD, "transaction_id": "tx-2", "timestamp": "2022-04-29T12:00:00Z"},
        {**GOOD, "transaction_id": "tx-3", "code": None},
        {**GOOD, "transaction_id": "", "code": "tokens"},
    ]
    response = post(server, bad)
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_errors"
    assert body["error_details"] == {
        "1": {"timestamp": ["invalid_format"]},
        "2": {"code": ["value_is_mandatory"]},
        "3": {"transaction_id": ["value_is_mandatory"]},
    }
    assert server.events() == []


def test_unknown_fields_are_dropped_and_ids_cast_to_strings(server):
    # EventsController#batch_params: strong params permit the known fields only (the rest is dropped silently)
    response = post(server, [{**GOOD, "extra": 1, "transaction_id": 42, "code": 7}])
    assert response.status_code == 200
    [stored] = server.events()
    assert "extra" not in stored and stored["transaction_id"] == "42" and stored["code"] == "7"


def test_float_and_integer_timestamps_are_accepted(server):
    # CreateBatchService: Time.zone.at(BigDecimal(timestamp.to_s)) reads any number or decimal text
    response = post(
        server,
        [
            {**GOOD, "transaction_id": "f", "timestamp": 1651240791.5},
            {**GOOD, "transaction_id": "i", "timestamp": 1651240791},
            {**GOOD, "transaction_id": "s", "timestamp": "1651240791.123"},
        ],
    )
    assert response.status_code == 200 and len(server.events()) == 3


def test_booleans_nulls_objects_and_lists_in_properties_are_stored(server):
    # EventsController permits `properties: {}` (any JSON object); only the OpenAPI schema says strings/numbers
    properties = {"seed": True, "none": None, "nested": {"a": 1}, "list": [1, "x"], "tokens": 3}
    assert post(server, [{**GOOD, "properties": properties}]).status_code == 200
    assert server.events()[0]["properties"] == properties


def test_a_missing_subscription_is_accepted(server):
    # Event model: only transaction_id and code are validated (such an event never bills)
    event = {key: value for key, value in GOOD.items() if key != "external_subscription_id"}
    assert post(server, [event]).status_code == 200


def test_a_failing_expression_is_a_string_error_at_its_index():
    # CreateBatchService#validate_events: result.errors[index] = expression_result.error.message (a string)
    with FakeLago(API_KEY, refuse_codes={"bad": "undefined variable"}) as server:
        response = post(server, [GOOD, {**GOOD, "transaction_id": "tx-2", "code": "bad"}])
        assert response.status_code == 422
        assert response.json()["error_details"] == {"1": "expression_evaluation_failed: undefined variable"}
        assert server.events() == []


def test_unknown_routes_are_404_resource_not_found(server):
    # config/routes.rb `match "*unmatched"` -> ApplicationController#not_found (resource: "resource")
    response = httpx.post(server.url + "/api/v1/evnts", json={}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and response.json()["code"] == "resource_not_found"


def test_get_one_event_by_transaction_id(server):
    # EventsController#show: find_by(organization, transaction_id), 404 event_not_found
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert post(server, [{**GOOD, "transaction_id": "a/b c"}]).status_code == 200
    found = httpx.get(server.url + "/api/v1/events/a%2Fb%20c", headers=headers)
    assert found.status_code == 200 and found.json()["event"]["external_subscription_id"] == "sub-1"
    missing = httpx.get(server.url + "/api/v1/events/nope", headers=headers)
    assert missing.status_code == 404 and missing.json()["code"] == "event_not_found"
    assert httpx.get(server.url + "/api/v1/events/a%2Fb%20c").status_code == 401


def test_postgres_store_checks_a_batch_transaction_id_across_subscriptions(server):
    # Events::CreateBatchService#bulk_insert_events (v1.39+): insert_all on the (subscription, id) unique index,
    # then each event takes its transaction_id out of the inserted rows: a second one in the batch is refused,
    # whatever its subscription, and the whole batch rolled back
    response = post(server, [GOOD, {**GOOD, "external_subscription_id": "sub-2", "properties": {"tokens": 9}}])
    assert response.status_code == 422
    assert response.json()["error_details"] == {"1": {"transaction_id": ["value_already_exist"]}}
    assert server.events() == []
    # in separate batches, the same id on two subscriptions is two events
    assert post(server, [GOOD]).status_code == 200
    assert post(server, [{**GOOD, "external_subscription_id": "sub-2"}]).status_code == 200
    assert len(server.events()) == 2


def test_a_repeated_transaction_id_is_422_value_already_exist_per_subscription(server):
    assert post(server, [GOOD]).status_code == 200
    again = post(server, [{**GOOD, "transaction_id": "tx-new"}, GOOD])
    assert again.status_code == 422
    assert again.json()["error_details"] == {"1": {"transaction_id": ["value_already_exist"]}}
    # the whole batch was refused: tx-new was not stored
    assert server.stored_transaction_ids() == {"tx-1": 1}
    # the same transaction_id on another subscription is another event
    assert post(server, [{**GOOD, "external_subscription_id": "sub-2"}]).status_code == 200


def test_the_single_event_endpoint(server):
    response = post(server, GOOD, path="/api/v1/events", root="event")
    assert response.status_code == 200 and response.json()["event"]["transaction_id"] == "tx-1"
    again = post(server, GOOD, path="/api/v1/events", root="event")
    assert again.status_code == 422
    assert again.json()["error_details"] == {"transaction_id": ["value_already_exist"]}


def test_clickhouse_mode_replaces_repeats_of_the_same_key_and_stores_another_code_as_another_event():
    # events_raw is a ReplacingMergeTree ordered by organization, code, subscription, timestamp (and its date),
    # transaction_id: a repeat with the same key replaces the event and the API answers 200
    with FakeLago(API_KEY, dedupe="clickhouse") as server:
        assert post(server, [GOOD]).status_code == 200
        assert post(server, [GOOD]).status_code == 200  # same key: replaced
        assert post(server, [{**GOOD, "timestamp": 1651240791.123}]).status_code == 200  # the same instant
        assert server.double_billed() == []
        assert post(server, [{**GOOD, "timestamp": "1651240792.000"}]).status_code == 200
        assert server.double_billed() == ["tx-1"]
        assert post(server, [{**GOOD, "code": "other"}]).status_code == 200
        assert server.stored_transaction_ids() == {"tx-1": 3}


def test_scripted_faults(server):
    server.fail("500")
    server.fail("429", reset="7", retry_after="3")
    server.fail("drop_after_store")
    assert post(server, [GOOD]).status_code == 500
    limited = post(server, [GOOD])
    assert limited.status_code == 429
    assert limited.headers["X-RateLimit-Reset"] == "7" and limited.headers["Retry-After"] == "3"
    with pytest.raises(httpx.RemoteProtocolError):
        post(server, [GOOD])
    assert server.stored_transaction_ids() == {"tx-1": 1}  # stored, though the answer never came
    assert post(server, [GOOD]).status_code == 422
