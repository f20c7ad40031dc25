"""A key created in the admin is shown once, on the response to the POST (issue 10, item 7).

Never in the messages framework (its cookie is signed, not encrypted; its session fallback is stored), never on a
later page, never cached (``Cache-Control: no-store``), never logged, never in the admin's history.
"""

from __future__ import annotations

import logging
import re

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.messages.storage.cookie import CookieStorage
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext

from tenants.apikeys import authenticate_key
from tenants.models import ApiKey
from tests.admin_fixtures import build_forest, staff_user, superuser
from tests.test_admin_scope import login, pk, url

pytestmark = pytest.mark.django_db

KEY_RE = re.compile(r"xk_[a-z0-9]{8,16}_[A-Za-z0-9]{32,128}")


@pytest.fixture(params=["superuser", "scoped"])
def client(request) -> Client:
    build_forest()
    return login(superuser() if request.param == "superuser" else staff_user("chat-admin", "acme-chat"))


def stored_messages(client: Client) -> list[str]:
    """Every message waiting in the cookie or the session, decoded (the cookie is compressed: grep would miss it)."""
    texts = []
    morsel = client.cookies.get(CookieStorage.cookie_name)
    if morsel is not None and morsel.value:
        storage = CookieStorage(RequestFactory().get("/"))
        decoded = storage._decode(morsel.value)  # type: ignore[attr-defined]
        texts += [str(message.message) for message in decoded or []]
    for session in Session.objects.all():
        texts.append(repr(session.get_decoded()))
    return texts


@pytest.mark.parametrize("button", ["_save", "_continue", "_addanother"])
def test_a_new_key_is_shown_once_on_the_posts_own_uncached_page(client, caplog, button):
    caplog.set_level(logging.DEBUG)  # every logger, SQL included (the debug cursor below)
    with CaptureQueriesContext(connection) as queries:
        response = client.post(url("apikey", "add"), {"tenant": pk("acme-chat-key-1"), "name": "worker", button: "1"})
    sql = [query["sql"] for query in queries.captured_queries]  # now: the next request clears the log
    assert response.status_code == 200
    html = response.content.decode()
    shown = KEY_RE.findall(html)
    assert len(set(shown)) == 1
    plaintext = shown[0]
    assert authenticate_key(plaintext).pk == ApiKey.objects.get().pk  # the real key, usable
    assert "no-store" in response["Cache-Control"] and "private" in response["Cache-Control"]
    secret = plaintext.rsplit("_", 1)[1]
    # Not in any cookie set by this response, nor in any message stored for a later page.
    assert all(secret not in morsel.value for morsel in response.cookies.values())
    assert all(secret not in text for text in stored_messages(client))
    # Not on any later page.
    for later in (
        url("apikey", "changelist"),
        url("apikey", "change", ApiKey.objects.get().pk),
        url("apikey", "history", ApiKey.objects.get().pk),
        url("apikey", "add"),
        "/admin/",
    ):
        page = client.get(later)
        assert page.status_code == 200, later
        assert secret not in page.content.decode(), later
        assert not KEY_RE.search(page.content.decode()), later
    # Not logged, not in a query, not in the admin's history.
    assert secret not in caplog.text
    assert any("INSERT" in statement for statement in sql)  # the debug cursor did record the SQL
    assert all(secret not in statement for statement in sql)
    assert all(secret not in f"{entry.object_repr} {entry.change_message}" for entry in LogEntry.objects.all())
    assert ApiKey.objects.filter(secret_hash__contains=secret).count() == 0


def test_the_key_page_links_to_the_key_by_its_public_prefix_only(client):
    response = client.post(url("apikey", "add"), {"tenant": pk("acme-chat-key-1"), "name": "worker"})
    key = ApiKey.objects.get()
    html = response.content.decode()
    assert url("apikey", "change", key.pk) in html and key.prefix in html
    detail = client.get(url("apikey", "change", key.pk)).content.decode()
    assert key.prefix in detail and key.secret_hash not in detail
