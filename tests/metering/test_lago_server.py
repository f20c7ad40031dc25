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


def test_missing_root_key_is_400(server):
    response = post(server, [GOOD], root="evnts")
    assert response.status_code == 400
    assert response.json()["error"].startswith("BadRequest")


def test_a_batch_is_all_or_nothing_and_errors_are_keyed_by_index(server):
    bad = [
        GOOD,
        {**GOOD, "transaction_id": "tx-2", "timestamp": "2022-04-29T12:00:00Z"},
        {**GOOD, "transaction_id": "tx-3", "properties": {"nested": {"a": 1}}},
        {**GOOD, "transaction_id": "tx-4", "code": None, "extra": 1},
        {**GOOD, "transaction_id": "tx-5", "timestamp": 1651240791.5},
    ]
    response = post(server, bad)
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_errors"
    assert body["error_details"] == {
        "1": {"timestamp": ["invalid_format"]},
        "2": {"properties": ["invalid_format"]},
        "3": {"code": ["value_is_mandatory"], "extra": ["unknown_field"]},
        "4": {"timestamp": ["invalid_format"]},
    }
    assert server.events() == []


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


def test_clickhouse_mode_replaces_repeats_and_reports_another_timestamp_as_double_billing():
    with FakeLago(API_KEY, dedupe="clickhouse") as server:
        assert post(server, [GOOD]).status_code == 200
        assert post(server, [GOOD]).status_code == 200  # same transaction_id + timestamp: replaced
        assert server.double_billed() == []
        assert post(server, [{**GOOD, "timestamp": "1651240792.000"}]).status_code == 200
        assert server.double_billed() == ["tx-1"]


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
