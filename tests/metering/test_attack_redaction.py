"""Attacks on the redaction of sink credentials: a collector that echoes our ``Authorization`` header back, not as
Python's ``json`` writes it but as other stacks escape text — PHP's ``json_encode`` (``\\/``), encoders that write
``\\u002F`` (upper-case hex), form encoding with lower-case ``%2f``, HTML entities (``&#x2F;``). The credential
must be in none of what we store (outbox, ``SinkState``), log or show (``metering_status``), in any of those forms.

The echo server here is a real HTTP server on a socket (as a misconfigured collector or debugging proxy would be);
the credentials hold ``/``, ``+`` and ``=`` (a base64-style Lago key; a password whose Basic form holds ``/``)."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest
from django.core.management import call_command

from metering.delivery.deliver import flush
from metering.delivery.sinks.lago import LagoSink
from metering.models import SinkState, UsageOutbox
from tests.lago_support import lago_metering, record, webhook_metering

pytest_plugins = ["tests.lago_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)

LAGO_KEY = "lago/Key+Secret=0123456789/abcdef"
PASSWORD = "s3cr?t>>word??"  # its Basic form holds "/" and "+"
BASIC = base64.b64encode(f"hook-user:{PASSWORD}".encode()).decode()
assert "/" in BASIC and "+" in BASIC


def _percent_lower(text: str) -> str:
    return "".join(c if c.isalnum() else "%" + format(ord(c), "02x") for c in text)


def _unicode_upper(text: str) -> str:
    return "".join(c if c.isalnum() or c == " " else "\\u" + format(ord(c), "04X") for c in text)


STYLES: dict[str, Callable[[str], str]] = {
    "php_json": lambda value: json.dumps(value).replace("/", "\\/"),
    "json_unicode_upper_hex": lambda value: f'"{_unicode_upper(value)}"',
    "form_lower_percent": _percent_lower,
    "form_upper_percent": lambda value: quote(value, safe=""),
    "html_hex_entities": lambda value: "".join(c if c.isalnum() else f"&#x{ord(c):X};" for c in value),
    "html_decimal_entities": lambda value: "".join(c if c.isalnum() else f"&#{ord(c)};" for c in value),
    "html_escape": lambda value: html.escape(value).replace("/", "&#x2f;"),
}


class Echo(BaseHTTPRequestHandler):
    style: Callable[[str], str] = staticmethod(str)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = f'{{"error": "unavailable", "authorization": {self.style(self.headers.get("Authorization", ""))}}}'
        encoded = body.encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        self.wfile.write(encoded)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(params=sorted(STYLES))
def echo(request: pytest.FixtureRequest) -> Iterator[str]:
    handler = type("StyledEcho", (Echo,), {"style": staticmethod(STYLES[request.param])})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def everything_kept(caplog: pytest.LogCaptureFixture) -> str:
    rows = [*UsageOutbox.objects.values_list("last_error", flat=True)]
    for state in SinkState.objects.all():
        rows += [state.last_error, state.blocked_reason]
    out = io.StringIO()
    call_command("metering_status", stdout=out)
    return "\n".join([*rows, out.getvalue(), caplog.text])


def assert_no_form_of(secret: str, kept: str) -> None:
    for style, encode in STYLES.items():
        form = encode(secret).strip('"')
        for part in (form, form[: len(form) // 2], form[len(form) // 2 :]):
            assert part not in kept, f"the {style} form of the credential was kept:\n{kept}"


def test_a_lago_key_echoed_in_another_stacks_escaping_is_never_kept(settings, echo, private_queue, org, caplog):
    settings.METERING = lago_metering(echo, API_KEY=LAGO_KEY, CELERY_QUEUE=private_queue)
    caplog.set_level(logging.DEBUG)
    record("key1", 3, transaction_id="t-styled-echo")
    flush()
    kept = everything_kept(caplog)
    assert "unavailable" in kept  # the collector's answer was stored: only the credential is gone
    assert_no_form_of(LAGO_KEY, kept)


def test_basic_credentials_echoed_in_another_stacks_escaping_are_never_kept(settings, echo, private_queue, org, caplog):
    url = echo.replace("http://", f"http://hook-user:{quote(PASSWORD, safe='')}@") + "/ingest"
    settings.METERING = webhook_metering(url, CELERY_QUEUE=private_queue)
    caplog.set_level(logging.DEBUG)
    record("key1", 3, transaction_id="t-styled-echo-hook")
    flush()
    kept = everything_kept(caplog)
    assert "unavailable" in kept
    assert_no_form_of(BASIC, kept)
    assert_no_form_of(PASSWORD, kept)


def test_redaction_leaves_text_that_only_resembles_the_credential(settings):
    settings.METERING = lago_metering("http://127.0.0.1:9/", API_KEY=LAGO_KEY)
    sink = LagoSink()
    near = "lago/Key+Secret=0123456789/abcdeX and lago%2FKey"  # one character off, and a prefix alone
    assert sink.redact(near) == near
    assert sink.redact(f"[{LAGO_KEY}]") == "[[redacted]]"
