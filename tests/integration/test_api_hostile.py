"""Hostile requests against the HTTP surface (REST API and demo): every one is a JSON 4xx naming its culprit, and
nothing is stored. Bodies nested 10,000 deep, NaN, invalid UTF-8, lone surrogates, NUL, oversized and chunked
bodies, unknown paths with any method, Unicode digits in ids, repeated or unprintable query parameters,
out-of-range times; and with DEBUG off a 500 anywhere still logs its traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from django.test import Client, RequestFactory

from metering.api.base import MAX_JSON_DEPTH
from metering.api.events import max_body_bytes
from metering.models import UsageRecord
from project.demo import MAX_BODY_BYTES as DEMO_MAX_BODY_BYTES
from project.errors import csrf_failure
from quotas.models import QuotaLimit
from tests.api_helpers import error_of, event
from tests.identity_helpers import acting_for
from tests.quota_helpers import limit

pytest_plugins = ["tests.api_fixtures"]

EVENTS = "/api/v1/events"
QUOTAS = "/api/v1/quotas"
DEMOS = ["/demo/completions", "/demo/completions-async"]


@pytest.fixture
def quota(forest):
    return limit("acme-chat-key-1", 1000)


@pytest.fixture
def bodies(quota):
    """Every JSON-reading API route, as (method, path)."""
    return [("post", EVENTS), ("post", QUOTAS), ("put", f"{QUOTAS}/{quota.pk}"), ("patch", f"{QUOTAS}/{quota.pk}")]


def nothing_stored(quota: QuotaLimit | None = None) -> None:
    assert UsageRecord.objects.count() == 0
    if quota is not None:
        assert list(QuotaLimit.objects.values_list("pk", "limit")) == [(quota.pk, quota.limit)]


def send_raw(api, method, path, raw: bytes, **extra):
    return api.client.generic(
        method.upper(), path, raw, content_type="application/json", headers=api.headers("project"), **extra
    )


def demo_raw(path, raw: bytes, **extra):
    headers = acting_for("acme-chat-key-1")
    return Client().generic("POST", path, raw, content_type="application/json", headers=headers, **extra)


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


HOSTILE_BODIES = {
    "nested 10,000 deep": deep(10_000),
    "nested one level too deep": deep(MAX_JSON_DEPTH + 1),
    "deep inside an object": b'{"metadata": ' + deep(5_000) + b"}",
    "NaN": b'{"quantity": NaN}',
    "Infinity": b'{"quantity": Infinity}',
    "-Infinity": b'{"quantity": -Infinity}',
    "invalid UTF-8": b'{"feature_name": "\xff\xfe"}',
    "an overlong UTF-8 encoding": b'{"a": "\xc0\xaf"}',
    "a UTF-8 BOM": b'\xef\xbb\xbf{"a": 1}',
    "UTF-16": '{"a": 1}'.encode("utf-16"),
    "truncated": b'{"feature_name": "x"',
    "trailing garbage": b'{"a": 1} x',
    "an integer of 5,000 digits": b'{"quantity": ' + b"9" * 5000 + b"}",
    "empty object key only": b"{",
}


# ---- JSON parsing: one bounded parser everywhere ----


@pytest.mark.parametrize("name", HOSTILE_BODIES)
def test_hostile_json_bodies_are_400_invalid_json_on_every_api_route(api, bodies, quota, name):
    for method, path in bodies:
        response = send_raw(api, method, path, HOSTILE_BODIES[name])
        assert response.status_code == 400, (name, method, path, response.content[:300])
        error = error_of(response)
        assert (error["code"], error["field"]) == ("invalid_json", "body"), (name, method, path, error)
    nothing_stored(quota)


@pytest.mark.parametrize("name", HOSTILE_BODIES)
@pytest.mark.parametrize("path", DEMOS)
def test_hostile_json_bodies_are_400_invalid_json_on_the_demo(forest, path, name):
    response = demo_raw(path, HOSTILE_BODIES[name])
    assert response.status_code == 400, response.content[:300]
    assert (error_of(response)["code"], error_of(response)["field"]) == ("invalid_json", "body")
    nothing_stored()


def test_a_body_as_deep_as_allowed_is_parsed(api):
    # MAX_JSON_DEPTH levels parse; the body is then refused for what it is (not an event), not as unparsable.
    response = send_raw(api, "post", EVENTS, b'{"events": ' + deep(MAX_JSON_DEPTH - 1) + b"}")
    assert response.status_code == 422
    assert error_of(response)["details"] == {"0": {"event": ["invalid_event"]}}


def test_the_tiniest_exponent_is_judged_as_written_not_as_zero(api):
    response = send_raw(api, "post", EVENTS, json.dumps(event()).replace('"10"', "1e-9999999").encode())
    assert response.status_code == 422, response.content
    assert error_of(response)["details"] == {"0": {"quantity": ["invalid_quantity"]}}
    nothing_stored()


@pytest.mark.parametrize(("method", "path_of"), [("post", None), ("put", "detail"), ("patch", "detail")])
def test_the_quota_routes_refuse_a_limit_of_the_tiniest_exponent(api, quota, method, path_of):
    path = QUOTAS if path_of is None else f"{QUOTAS}/{quota.pk}"
    raw = b'{"tenant_id": "acme-chat-key-2", "feature": "x", "limit": 1e-9999999}'
    if method != "post":
        raw = b'{"limit": 1e-9999999}'
    response = send_raw(api, method, path, raw)
    assert response.status_code == 400, response.content
    assert (error_of(response)["code"], error_of(response)["field"]) == ("invalid_limit", "limit")
    nothing_stored(quota)


# ---- lone surrogates and NUL: a 4xx naming the field, never a 500 ----

SURROGATE = "\\ud800"  # as JSON text writes it: json.loads makes it a lone surrogate, which UTF-8 cannot encode
NUL = "\\u0000"


def event_text(**fields: str) -> bytes:
    """An event as JSON text, with ``fields`` spliced in raw (so escapes reach the server's parser as written)."""
    base = {"tenant_id": '"acme-chat-key-1"', "feature_name": '"llm_tokens"', "quantity": '"10"'}
    base["transaction_id"] = '"tx-1"'
    base.update(fields)
    return ("{" + ", ".join(f'"{name}": {value}' for name, value in base.items()) + "}").encode()


EVENT_FIELD_TEMPLATES = [
    ("tenant_id", '"{}"'),
    ("feature_name", '"llm_tokens{}"'),
    ("transaction_id", '"tx{}"'),
    ("quantity", '"1{}"'),
    ("metadata", '{{"key{}": 1}}'),
    ("metadata", '{{"key": "value{}"}}'),
    ("metadata", '{{"key": ["nested {}"]}}'),
    ("timestamp", '"2025-01-31T12:00:00Z{}"'),
]
BAD_TEXT = [SURROGATE, NUL, "\\udfff\\ud800", "a" + SURROGATE, "\\n"]


@pytest.mark.parametrize(
    ("field", "template", "bad"),
    [
        (field, template, bad)
        for field, template in EVENT_FIELD_TEMPLATES
        for bad in BAD_TEXT
        if not (field == "metadata" and bad == "\\n")  # a newline is a fine character inside metadata
    ],
)
def test_control_characters_and_lone_surrogates_in_an_event_field_are_422_naming_it(api, field, template, bad):
    response = send_raw(api, "post", EVENTS, event_text(**{field: template.format(bad)}))
    assert response.status_code == 422, response.content
    error = error_of(response)
    assert list(error["details"]["0"]) == [field], error
    nothing_stored()


@pytest.mark.parametrize("bad", [SURROGATE, NUL])
def test_a_lone_surrogate_or_nul_in_a_json_key_is_an_unknown_field(api, bad):
    response = send_raw(api, "post", EVENTS, event_text(**{f"x{bad}": "1"}))
    assert response.status_code == 422
    error = error_of(response)  # the answer itself is valid JSON (non-ASCII is escaped), not a UnicodeEncodeError
    assert error["details"] == {"0": {f"x{json.loads(chr(34) + bad + chr(34))}": ["unknown_field"]}}
    nothing_stored()


@pytest.mark.parametrize("bad", [SURROGATE, NUL])
@pytest.mark.parametrize(
    ("field", "template", "code"),
    [
        # DRF's CharField refuses NUL and surrogates itself (null_characters_not_allowed, ...) before our validators.
        (
            "tenant_id",
            '"acme-chat-key-2{}"',
            "invalid_tenant_id|null_characters_not_allowed|surrogate_characters_not_allowed",
        ),
        (
            "feature",
            '"api_calls{}"',
            "invalid_feature_name|null_characters_not_allowed|surrogate_characters_not_allowed",
        ),
        ("limit", '"10{}"', "invalid_limit"),
        ("period", '"day{}"', "invalid_choice"),
        ("enforcement", '"hard{}"', "invalid_choice"),
    ],
)
def test_control_characters_and_lone_surrogates_in_a_quota_field_are_400_naming_it(
    api, quota, field, template, code, bad
):
    fields = {"tenant_id": '"acme-chat-key-2"', "feature": '"api_calls"', "limit": '"10"'}
    fields[field] = template.format(bad)
    raw = ("{" + ", ".join(f'"{name}": {value}' for name, value in fields.items()) + "}").encode()
    response = send_raw(api, "post", QUOTAS, raw)
    assert response.status_code == 400, response.content
    error = error_of(response)
    assert error["code"] in code.split("|") and error["field"] == field, error
    nothing_stored(quota)


@pytest.mark.parametrize("path", DEMOS)
def test_a_lone_surrogate_in_the_demo_prompt_is_answered_not_a_500(forest, path):
    response = demo_raw(path, b'{"prompt": "hello \\ud800 world"}')
    assert response.status_code == 200, response.content
    assert response.json()["tokens"] == 3


# ---- sizes and framing ----


def test_a_quota_body_beyond_the_upload_limit_is_413(api, quota, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    raw = json.dumps({"tenant_id": "acme-chat-key-2", "feature": "x", "limit": "1", "pad": "x" * 1000}).encode()
    for method, path in [("post", QUOTAS), ("patch", f"{QUOTAS}/{quota.pk}")]:
        response = send_raw(api, method, path, raw)
        assert response.status_code == 413
        assert (error_of(response)["code"], error_of(response)["field"]) == ("payload_too_large", "body")
    nothing_stored(quota)


def test_an_events_body_beyond_a_full_batch_is_413(api):
    raw = b'{"events": [' + b" " * max_body_bytes() + b"]}"
    response = send_raw(api, "post", EVENTS, raw)
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"
    nothing_stored()


@pytest.mark.parametrize("path", DEMOS)
def test_an_oversized_demo_body_is_json_413(forest, path):
    raw = json.dumps({"prompt": "word " * DEMO_MAX_BODY_BYTES}).encode()
    response = demo_raw(path, raw)
    assert response.status_code == 413
    assert (error_of(response)["code"], error_of(response)["field"]) == ("payload_too_large", "body")
    nothing_stored()


@pytest.mark.parametrize("path", DEMOS)
def test_a_demo_body_beyond_djangos_upload_limit_is_json_413(forest, path, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10  # below the demo's own bound: Django's RequestDataTooBig
    response = demo_raw(path, b'{"prompt": "one two three"}')
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"
    nothing_stored()


def test_a_chunked_body_without_content_length_is_411_not_an_empty_body(api, bodies, quota):
    for method, path in bodies:
        response = api.client.generic(
            method.upper(),
            path,
            json.dumps(event()),
            content_type="application/json",
            CONTENT_LENGTH="",
            HTTP_TRANSFER_ENCODING="chunked",
            HTTP_AUTHORIZATION=f"Bearer {api.keys['project']}",
        )
        assert response.status_code == 411, (method, path, response.content)
        assert (error_of(response)["code"], error_of(response)["field"]) == ("length_required", "Content-Length")
    nothing_stored(quota)


@pytest.mark.parametrize("path", DEMOS)
def test_a_chunked_demo_body_is_411(forest, path):
    response = demo_raw(path, b'{"prompt": "one two"}', CONTENT_LENGTH="", HTTP_TRANSFER_ENCODING="chunked")
    assert response.status_code == 411
    assert error_of(response)["code"] == "length_required"
    nothing_stored()


def test_a_body_without_content_type_is_415_not_silently_empty(api, quota):
    response = api.client.generic(
        "POST",
        QUOTAS,
        b'{"tenant_id": "acme-chat-key-2", "feature": "x", "limit": "1"}',
        content_type="",
        headers=api.headers("project"),
    )
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"
    nothing_stored(quota)


# ---- paths and methods: JSON everywhere under /api/ and /demo/ ----

UNKNOWN_PATHS = ["/api/v1/nothing", "/api/v1/events/", "/api/nothing", "/api", "/api/v2/events", "/demo/x", "/demo"]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", UNKNOWN_PATHS)
def test_unknown_paths_are_json_404_with_any_method_even_with_csrf_checks(db, path, method):
    client = Client(enforce_csrf_checks=True)
    client.cookies["csrftoken"] = "x" * 32  # a browser's cookie without the matching header: still not a 403
    response = client.generic(method, path, b'{"a": 1}', content_type="application/json")
    assert response.status_code == 404, response.content[:200]
    assert error_of(response)["code"] == "not_found"


@pytest.mark.parametrize(
    "raw_id", ["³", "\u0661\u0662", "\uff11", "99999999999999999999", "9223372036854775808", "0", "-1", "1.0"]
)
@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
def test_quota_ids_that_are_not_ascii_digits_of_a_bigint_are_json_404(api, quota, raw_id, method):
    response = api.client.generic(
        method, f"{QUOTAS}/{raw_id}", b'{"limit": "1"}', content_type="application/json", headers=api.headers("project")
    )
    assert response.status_code == 404, response.content
    assert error_of(response)["code"] == "not_found"
    nothing_stored(quota)


def test_the_largest_bigint_id_is_a_plain_404(api, quota):
    response = api.get(f"{QUOTAS}/9223372036854775807")
    assert response.status_code == 404
    assert error_of(response)["field"] == "id"


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", DEMOS)
def test_the_demo_answers_json_405_with_allow(forest, path, method):
    response = Client().generic(method, path, headers={"X-Tenant-ID": "acme-chat-key-1"})
    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert error_of(response)["code"] == "method_not_allowed"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_api_wrong_methods_are_json_405(api, method):
    response = api.client.generic(
        method, EVENTS, b"{}", content_type="application/json", headers=api.headers("project")
    )
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"
    assert "POST" in response["Allow"]


def test_the_api_and_the_demo_are_csrf_exempt(api, quota):
    client = Client(enforce_csrf_checks=True)
    client.cookies["csrftoken"] = "x" * 32
    response = client.post(EVENTS, json.dumps(event()), content_type="application/json", headers=api.headers("project"))
    assert response.status_code == 201, response.content
    response = client.patch(
        f"{QUOTAS}/{quota.pk}",
        json.dumps({"limit": "5"}),
        content_type="application/json",
        headers=api.headers("project"),
    )
    assert response.status_code == 200, response.content
    response = client.post(
        DEMOS[0], json.dumps({"prompt": "a b"}), content_type="application/json", headers=api.headers("project")
    )
    assert response.status_code == 200, response.content


@pytest.mark.parametrize("path", ["/api/v1/events", "/api/anything", "/demo/completions"])
def test_a_csrf_failure_under_api_or_demo_is_json_403(path):
    response = csrf_failure(RequestFactory().post(path), "CSRF cookie not set.")
    assert response.status_code == 403
    assert response["Content-Type"] == "application/json"
    assert json.loads(response.content)["error"]["code"] == "csrf_failed"


def test_a_csrf_failure_elsewhere_keeps_djangos_page(db):
    client = Client(enforce_csrf_checks=True)
    response = client.post("/admin/login/", {"username": "x", "password": "y"})
    assert response.status_code == 403
    assert response["Content-Type"].startswith("text/html")


# ---- query strings ----


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [
        ("/api/v1/usage", "feature=a&feature=b", "feature"),
        ("/api/v1/usage", "feature=a&tenant_id=acme-chat&tenant_id=acme", "tenant_id"),
        ("/api/v1/entitlements", "feature=a&quantity=1&quantity=2", "quantity"),
        ("/api/v1/quotas", "page=1&page=2", "page"),
        ("/api/v1/quotas", "feature=", "feature"),
    ],
)
def test_a_repeated_or_blank_query_parameter_is_400_naming_it(api, path, query, field):
    response = api.client.get(f"{path}?{query}", headers=api.headers("project"))
    assert response.status_code == 400, response.content
    assert error_of(response)["field"] == field


@pytest.mark.parametrize("value", ["%00", "a%00b", "llm_tokens%0A", "%1F", "%7F", "%ED%A0%80", "%FF"])
@pytest.mark.parametrize(
    ("path", "name", "rest"),
    [
        ("/api/v1/usage", "feature", ""),
        ("/api/v1/usage", "tenant_id", "&feature=llm_tokens"),
        ("/api/v1/usage", "at", "&feature=llm_tokens"),
        ("/api/v1/entitlements", "quantity", "&feature=llm_tokens"),
        ("/api/v1/quotas", "feature", ""),
        ("/api/v1/quotas", "tenant_id", ""),
        ("/api/v1/quotas", "page", ""),
    ],
)
def test_control_characters_and_broken_utf8_in_query_values_are_400_naming_the_parameter(api, path, name, rest, value):
    response = api.client.get(f"{path}?{name}={value}{rest}", headers=api.headers("project"))
    assert response.status_code == 400, response.content
    assert error_of(response)["field"] == name


@pytest.mark.parametrize("value", ["\u0661", "²", "1_0", " 2", "2.0", "+2", "0x2", "1e1"])
@pytest.mark.parametrize("name", ["page", "page_size"])
def test_pagination_takes_ascii_digits_only(api, name, value):
    response = api.get(QUOTAS, **{name: value})
    assert response.status_code == 400, response.content
    assert error_of(response)["field"] == name


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"at": "0001-01-01T00:00:00+01:00"}, "at"),  # before year 1 once in UTC
        ({"at": "9999-12-31T23:59:59-01:00"}, "at"),  # after year 9999 once in UTC
        ({"at": "9999-12-31T12:00:00Z", "period": "month"}, "at"),  # its month ends after year 9999
        ({"start": "0001-01-01T00:00:00+00:01"}, "start"),
        ({"end": "9999-12-31T23:59:59.999999-23:59"}, "end"),
        ({"at": " 2025-01-31T12:00:00Z"}, "at"),
        ({"at": "\uff12\uff10\uff12\uff15-01-31T12:00:00Z"}, "at"),
        ({"at": "2025-01-31T12:00:00Z" + "0" * 100}, "at"),
    ],
)
def test_out_of_range_or_malformed_times_in_usage_queries_are_400(api, forest, query, field):
    response = api.get("/api/v1/usage", feature="llm_tokens", **query)
    assert response.status_code == 400, response.content
    assert (error_of(response)["code"], error_of(response)["field"]) == ("invalid_datetime", field)


def test_rfc_3339_lower_case_t_and_z_are_read(api, forest):
    response = api.get("/api/v1/usage", feature="llm_tokens", at="2025-01-31t12:00:00z", period="day")
    assert response.status_code == 200, response.content
    assert response.json()["start"] == "2025-01-31T00:00:00Z"


@pytest.mark.parametrize(
    "timestamp",
    [
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "2025-01-31T12:00:00Z\n",
        "\uff12\uff10\uff12\uff15-01-31T12:00:00Z",
        1e300,
        -1e300,
        10**30,
        10**309,  # no float holds it
        -(10**400),
    ],
)
def test_out_of_range_event_timestamps_are_422_naming_timestamp(api, timestamp):
    response = api.post(EVENTS, event(timestamp=timestamp))
    assert response.status_code == 422, response.content
    assert error_of(response)["details"] == {"0": {"timestamp": ["invalid_timestamp"]}}
    nothing_stored()


def test_timestamp_null_means_now(api):
    assert api.post(EVENTS, event(timestamp=None)).status_code == 201
    assert UsageRecord.objects.count() == 1


def test_metadata_null_means_no_metadata(api):
    response = api.post(EVENTS, event(metadata=None))
    assert response.status_code == 201
    assert UsageRecord.objects.get().metadata == {}


# ---- 500s are logged with DEBUG off, outside the API too ----

LOGGED_500 = textwrap.dedent(
    """
    import django
    django.setup()
    from django.test import Client
    import project.demo

    def broken(request):
        raise RuntimeError("boom from the demo")

    project.demo.parse_request = broken
    response = Client(raise_request_exception=False).post(
        "/demo/completions", b'{"prompt": "x"}', content_type="application/json"
    )
    print("STATUS", response.status_code, response["Content-Type"], response.content.decode())
    """
)


def test_with_debug_off_a_500_outside_the_api_logs_its_traceback_and_answers_json(tmp_path):
    env = {
        **os.environ,
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "test-hostile-" + "k" * 40,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "VAR_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", LOGGED_500], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "STATUS 500 application/json" in done.stdout and '"server_error"' in done.stdout, done.stdout
    assert "Traceback (most recent call last)" in done.stderr, done.stderr
    assert "RuntimeError: boom from the demo" in done.stderr
    assert "Internal Server Error: /demo/completions" in done.stderr


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "/api/schema/", {}, 405),
        ("DELETE", "/api/docs/", {}, 405),
        ("GET", "/api/schema/", {"Accept": "text/csv"}, 406),
        ("GET", "/api/schema/?format=xml", {}, 404),
    ],
)
def test_the_schema_and_docs_pages_answer_their_errors_as_json(db, method, path, headers, status):
    response = Client(enforce_csrf_checks=True).generic(method, path, headers=headers)
    assert response.status_code == status
    assert error_of(response)["code"] in {"method_not_allowed", "not_acceptable", "not_found"}
    if status == 405:
        assert "GET" in response["Allow"]


@pytest.mark.parametrize("path", ["/api/v1/usage", "/api/v1/quotas", "/api/v1/entitlements", "/api/schema/"])
@pytest.mark.parametrize("key", ["project", None])
def test_more_query_parameters_than_django_reads_is_a_json_400(api, path, key):
    query = "&".join(f"p{index}=1" for index in range(1001))  # DATA_UPLOAD_MAX_NUMBER_FIELDS is 1000
    response = api.client.get(f"{path}?{query}", headers=api.headers(key))
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/json"
    assert error_of(response)["code"] in {"bad_request", "unknown_field", "repeated_parameter"}


@pytest.mark.parametrize("path", ["/api/docs/", "/api/schema/"])
def test_options_on_the_schema_and_docs_is_json_405(db, path):
    response = Client().options(path)
    assert response.status_code == 405
    assert response["Content-Type"] == "application/json" and "GET" in response["Allow"]


@pytest.mark.parametrize("path", ["/api/v1/usage", "/demo/completions", "/api/nothing"])
def test_a_host_outside_allowed_hosts_is_a_json_400_under_api_and_demo(db, path):
    response = Client().get(path, headers={"Host": "evil.example"})
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert error_of(response)["code"] == "bad_request"


def test_a_quota_deleted_while_being_changed_stays_deleted(api, quota):
    """A PATCH that read the row before a concurrent DELETE must not INSERT it again under its old id."""
    from metering.api.errors import ApiError
    from quotas.api import _save

    stale = QuotaLimit.objects.get(pk=quota.pk)
    assert api.client.delete(f"{QUOTAS}/{quota.pk}", headers=api.headers("project")).status_code == 204
    stale.limit = 7
    with pytest.raises(ApiError) as answered:
        _save(stale, update=True)
    assert answered.value.status_code == 404
    assert not QuotaLimit.objects.exists()
