"""Secrets of the delivery path: a collector that echoes our request headers back never gets the credential stored
(outbox, ``SinkState``), logged or shown by ``metering_status``; the stored configuration fingerprint is keyed."""

from __future__ import annotations

import base64
import hashlib
import io
import logging

import pytest
from django.core.management import call_command
from django.test import override_settings

from metering.delivery.deliver import flush
from metering.delivery.sinks.base import REDACTED
from metering.delivery.sinks.lago import LagoSink
from metering.models import SinkState, UsageOutbox
from tests.lago_support import API_KEY, WEBHOOK_SECRET, lago_metering, record, webhook_metering

pytest_plugins = ["tests.lago_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


def stored_texts() -> str:
    """Everything of the delivery state an operator (or a database dump) can read."""
    rows = [*UsageOutbox.objects.values_list("last_error", flat=True)]
    for state in SinkState.objects.all():
        rows += [state.last_error, state.blocked_reason, state.config_fingerprint]
    return "\n".join(rows)


def status_output() -> str:
    out = io.StringIO()
    call_command("metering_status", stdout=out)
    return out.getvalue()


@pytest.mark.parametrize(
    ("status", "pad"), [(500, 0), (401, 0), (422, 0), (400, 0), *((503, pad) for pad in range(300, 480, 9))]
)
def test_an_echoing_lago_never_gets_the_api_key_stored_logged_or_shown(
    settings, lago, private_queue, org, caplog, status, pad
):
    # pad > 0 sweeps the key across the 500-character cut of the stored excerpt: no part may survive the cut.
    settings.METERING = lago_metering(lago.url, CELERY_QUEUE=private_queue)
    caplog.set_level(logging.DEBUG)
    lago.fail("echo", times=5, status=status, pad=pad)
    record("key1", 3, transaction_id="t-echo")
    flush()
    assert lago.requests and lago.requests[0].fault == "echo"  # the collector really echoed our headers
    seen = stored_texts() + status_output() + caplog.text
    assert pad or REDACTED in seen
    for part in (API_KEY, API_KEY[:8], API_KEY[-8:]):
        assert part not in seen


def test_an_echoing_webhook_never_gets_the_url_credentials_stored(settings, collector, private_queue, org, caplog):
    # Basic credentials in the URL travel as base64 in the Authorization header: that form is redacted too.
    url = collector.url.replace("http://", "http://hook-user:p%40ss-w0rd-secret@") + "/ingest"
    settings.METERING = webhook_metering(url, CELERY_QUEUE=private_queue)
    caplog.set_level(logging.DEBUG)
    collector.fail("echo", times=5, status=503)
    record("key1", 3, transaction_id="t-echo-hook")
    flush()
    seen = stored_texts() + status_output() + caplog.text
    basic = base64.b64encode(b"hook-user:p@ss-w0rd-secret").decode()
    assert collector.requests and collector.requests[0].fault == "echo"
    for secret in ("p@ss-w0rd-secret", "p%40ss-w0rd-secret", basic, WEBHOOK_SECRET):
        assert secret not in seen


def test_redaction_covers_the_escaped_forms_and_keeps_the_rest(settings):
    settings.METERING = lago_metering("http://127.0.0.1:9/", API_KEY='k/"ey+\\1')
    sink = LagoSink()
    text = 'Authorization: Bearer k/"ey+\\1 json "k/\\"ey+\\\\1" url k%2F%22ey%2B%5C1 status 500'
    redacted = sink.redact(text)
    assert 'k/"ey' not in redacted and "k%2F" not in redacted and 'k/\\"ey' not in redacted
    assert redacted.startswith("Authorization: Bearer ") and redacted.endswith("status 500")


def test_the_configuration_fingerprint_is_keyed_with_the_secret_key(settings):
    settings.METERING = lago_metering("http://127.0.0.1:9/")
    sink = LagoSink()
    plain = hashlib.sha256("\0".join([sink.name, "http://127.0.0.1:9/", API_KEY]).encode()).hexdigest()[:32]
    first = sink.fingerprint()
    assert first != plain  # an offline guess of name + URL + key cannot be checked against it
    with override_settings(SECRET_KEY="another-secret-key-" + "x" * 40):
        assert sink.fingerprint() != first
    settings.METERING = lago_metering("http://127.0.0.1:9/", API_KEY="rotated")
    assert sink.fingerprint() != first  # a rotated key still lifts a block by itself


def test_the_admin_does_not_show_the_fingerprint(admin_client, settings, lago, private_queue, org):
    settings.METERING = lago_metering(lago.url, CELERY_QUEUE=private_queue)
    lago.fail("echo", status=401)
    record("key1", 1, transaction_id="t-blocked")
    flush()
    state = SinkState.objects.get()
    assert state.blocked_at is not None and state.config_fingerprint
    page = admin_client.get(f"/admin/xaas_metering/sinkstate/{state.pk}/change/").content.decode()
    assert "401" in page and state.config_fingerprint not in page and API_KEY not in page
