"""A key created in the admin is shown once, on the response to the POST (issue 10, item 7).

Never in the messages framework (its cookie is signed, not encrypted; its session fallback is stored), never on a
later page, never cached (``Cache-Control: no-store``), never logged, never in the admin's history.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote

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
from tests.quotas.test_admin_scope import login, pk, url

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


# ---- no page a scoped administrator can open names a tenant outside its subtree ----

FOREIGN_PKS = (900001, 900002, 900003)


@pytest.fixture
def foreign_world():
    """chat-admin's forest plus a foreign tree with unmistakable ids and primary keys, each with every kind of row."""
    from datetime import timedelta

    from metering.events import utcnow
    from metering.models import UsageOutbox, UsageRecord
    from quotas.models import QuotaLimit, QuotaReservation
    from tenants.apikeys import create_api_key
    from tenants.models import Tenant
    from tests.factories import record

    build_forest()
    parent = None
    for tenant_pk, tenant_id, kind in zip(
        FOREIGN_PKS, ("zzforeign-org", "zzforeign-proj", "zzforeign-key"), ("zzforeignkind", "", ""), strict=True
    ):
        parent = Tenant(pk=tenant_pk, external_id=tenant_id, parent=parent, kind=kind, name=f"{tenant_id} name")
        parent.save()
    for tenant_id in ("zzforeign-key", "acme-search-key-1", "acme-chat-key-1"):
        record(tenant_id, 10, feature="zzforeignfeature" if tenant_id.startswith("zz") else "llm_tokens")
        quota_feature = "zzforeignquota" if tenant_id.startswith("zz") else "llm_tokens"
        QuotaLimit.objects.create(
            tenant=Tenant.objects.get(external_id=tenant_id), feature=quota_feature, limit=5, period="month"
        )
        create_api_key(tenant_id, name=f"zzforeignkeyname {tenant_id}" if tenant_id.startswith("zz") else "")
        now = utcnow()
        QuotaReservation.objects.create(
            tenant=Tenant.objects.get(external_id=tenant_id),
            feature="llm_tokens",
            units=1,
            window_at=now,
            expires_at=now + timedelta(minutes=5),
        )
    for fact in UsageRecord.objects.all():
        UsageOutbox.objects.create(record=fact, sink="lago", next_attempt_at=utcnow())


OUTSIDE_NAMES = ("zzforeign", "acme-search", "other-project")


def leaks(html: str, *, echoed: str = "") -> list[str]:
    """Outside tenants' ids, names and kinds, foreign features and key names, and the foreign tree's primary keys
    (unmistakable: 9000xx) — except what the request itself carried (``echoed``: a crafted query string)."""
    echoed = unquote(unquote(echoed))
    found = [name for name in OUTSIDE_NAMES if name in html and name not in echoed]
    found += re.findall(r"(?<![\w.:@-])(?:acme|other)(?![\w.:@-])", html)  # the ancestor and the other root
    found += [str(tenant_pk) for tenant_pk in FOREIGN_PKS if str(tenant_pk) in html and str(tenant_pk) not in echoed]
    return found


def crawl(client: Client) -> tuple[int, dict[str, list[str]]]:
    """Open every admin page reachable from the index (and crafted ones); the pages opened and their leaks."""
    from django.urls import reverse

    foreign = FOREIGN_PKS[-1]
    crafted = [
        # Initial values and popups naming an outside tenant: the widgets must not draw it.
        f"{url('tenant', 'add')}?parent={foreign}",
        f"{url('apikey', 'add')}?tenant={foreign}",
        f"{url('quotalimit', 'add')}?tenant={foreign}",
        f"{url('tenant', 'changelist')}?_popup=1&_to_field=id",
        f"{url('tenant', 'changelist')}?q=zzforeign",
        f"{url('tenant', 'changelist')}?parent__id__exact={foreign}",
        f"{url('quotalimit', 'changelist')}?tenant__id__exact={foreign}",
        f"{url('usagerecord', 'changelist')}?tenant__id__exact={foreign}",
    ]
    for app_label, model_name, field_name in (
        ("xaas_tenants", "tenant", "parent"),
        ("xaas_tenants", "apikey", "tenant"),
        ("xaas_quotas", "quotalimit", "tenant"),
        ("xaas_tenants", "tenantadminscope", "tenant"),
    ):
        for term in ("", "zz", "acme", "other"):
            crafted.append(
                f"{reverse('admin:autocomplete')}?app_label={app_label}&model_name={model_name}"
                f"&field_name={field_name}&term={term}"
            )
    queue, seen, opened = ["/admin/", *crafted], set[str](), 0
    found: dict[str, list[str]] = {}
    while queue and len(seen) < 400:
        page = queue.pop(0)
        if page in seen or "logout" in page:
            continue
        seen.add(page)
        response = client.get(page)
        assert response.status_code in (200, 302, 403, 404), (page, response.status_code)
        if response.status_code != 200:
            continue
        opened += 1
        html = response.content.decode()
        if leaked := leaks(html, echoed=page):
            found[page] = leaked
        for link in re.findall(r'href="(/admin/[^"#]*)"', html):
            link = link.replace("&amp;", "&")
            if link not in seen:
                queue.append(link)
    return opened, found


def test_no_admin_page_a_scoped_admin_can_open_reveals_tenants_outside_its_subtree(foreign_world):
    opened, found = crawl(login(staff_user("chat-admin", "acme-chat")))
    assert opened > 60  # the crawl did reach the tree, quotas, keys, usage, outbox, their filters and objects
    assert found == {}


def test_the_same_crawl_by_a_superuser_does_find_the_foreign_tree(foreign_world):
    """The detector works: where nothing is hidden, it reports the other trees on the pages that show them."""
    opened, found = crawl(login(superuser()))
    assert opened > 60
    pages_with_foreign = [page for page, leaked in found.items() if any("zzforeign" in item for item in leaked)]
    assert any("/tenant/" in page for page in pages_with_foreign)
    assert any("/apikey/" in page for page in pages_with_foreign)
    assert any("/quotalimit/" in page for page in pages_with_foreign)
    assert any("autocomplete" in page for page in pages_with_foreign)
