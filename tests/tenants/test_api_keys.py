"""API keys: issued once, stored hashed, revocable, expiring; the command, the admin, the resolver and the quota
decorator resolving a key's tenant."""

from __future__ import annotations

import hashlib
import io
import json
import re
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from metering.models import UsageRecord
from tenants.apikeys import KEY_RE, authenticate_key, create_api_key, revoke
from tenants.exceptions import InvalidApiKey, UnknownTenant
from tenants.models import ApiKey
from tests.api_helpers import error_of
from tests.factories import tree, usage
from tests.quota_helpers import limit

pytest_plugins = ["tests.api_fixtures"]


@pytest.fixture
def acme(db):
    return tree({"acme": None, "acme-chat": "acme", "acme-chat-key-1": "acme-chat", "other": None})


# ---- the key itself ----


def test_a_key_is_shown_once_and_stored_as_a_hash(acme):
    key, plaintext = create_api_key("acme-chat", name="worker")
    assert KEY_RE.match(plaintext)
    assert plaintext.startswith(f"xk_{key.prefix}_")
    stored = ApiKey.objects.get()
    assert stored.secret_hash == hashlib.sha256(plaintext.encode()).hexdigest()
    assert plaintext not in json.dumps(list(ApiKey.objects.values()), default=str)
    assert (stored.name, stored.tenant.external_id) == ("worker", "acme-chat")


def test_keys_are_unique_and_random(acme):
    made = [create_api_key("acme")[1] for _ in range(20)]
    assert len(set(made)) == 20
    assert len({key.split("_")[1] for key in made}) == 20


def test_authentication(acme):
    key, plaintext = create_api_key("acme-chat")
    assert authenticate_key(plaintext).pk == key.pk
    secret = plaintext.rsplit("_", 1)[1]
    for bad in (
        plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B"),  # wrong secret
        f"xk_zzzzzzzz_{secret}",  # unknown prefix
        "xk_short",
        plaintext + " ",
        "Bearer " + plaintext,
        "",
    ):
        with pytest.raises(InvalidApiKey):
            authenticate_key(bad)


def test_revoked_and_expired_keys_fail(acme):
    _, revoked = create_api_key("acme-chat")
    revoke(revoked)
    with pytest.raises(InvalidApiKey, match="revoked"):
        authenticate_key(revoked)
    _, expired = create_api_key("acme-chat", expires_in=timedelta(days=1))
    ApiKey.objects.filter(expires_at__isnull=False).update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(InvalidApiKey, match="expired"):
        authenticate_key(expired)
    _, future = create_api_key("acme-chat", expires_at=timezone.now() + timedelta(hours=1))
    assert authenticate_key(future)


def test_last_used_is_recorded_at_most_once_a_minute(acme):
    key, plaintext = create_api_key("acme-chat")
    assert key.last_used_at is None
    authenticate_key(plaintext)
    first = ApiKey.objects.get().last_used_at
    assert first is not None
    authenticate_key(plaintext)
    assert ApiKey.objects.get().last_used_at == first
    ApiKey.objects.update(last_used_at=first - timedelta(minutes=2))
    authenticate_key(plaintext)
    latest = ApiKey.objects.get().last_used_at
    assert latest is not None and latest > first - timedelta(minutes=2)


def test_revoking_twice_keeps_the_first_time(acme):
    key, plaintext = create_api_key("acme")
    first = revoke(key.prefix).revoked_at
    assert revoke(plaintext).revoked_at == first
    with pytest.raises(InvalidApiKey):
        revoke("nosuchpx")


def test_keys_of_unknown_tenants_cannot_be_made(acme):
    with pytest.raises(UnknownTenant):
        create_api_key("nope")


# ---- manage.py apikey ----


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("apikey", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_command_create_prints_only_the_key_on_stdout(acme):
    out, err = run("create", "acme-chat", "--name", "ci", "--expires-in-days", "30")
    plaintext = out.strip()
    assert KEY_RE.match(plaintext)
    key = authenticate_key(plaintext)
    assert key.name == "ci" and key.tenant.external_id == "acme-chat"
    assert key.expires_at is not None
    assert timedelta(days=29) < key.expires_at - timezone.now() <= timedelta(days=30)
    assert "shown once" in err and plaintext not in err


def test_command_create_without_expiry(acme):
    out, _ = run("create", "acme")
    assert authenticate_key(out.strip()).expires_at is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("create", "nope"), "unknown tenant"),
        (("create", "acme", "--expires-in-days", "0"), "at least 1"),
        (("create", "acme", "--expires-in-days", "soon"), "whole number"),
        (("revoke", "nosuchpx"), "no API key"),
    ],
)
def test_command_errors(acme, args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)
    assert not ApiKey.objects.exists()


def test_command_revoke_and_list(acme):
    key, plaintext = create_api_key("acme-chat", name="old")
    create_api_key("acme", name="org")
    out, _ = run("revoke", key.prefix)
    assert f"revoked {key.prefix} of acme-chat" in out
    with pytest.raises(InvalidApiKey):
        authenticate_key(plaintext)
    listing, _ = run("list")
    assert key.prefix in listing and "revoked" in listing and "active" in listing
    assert plaintext not in listing and key.secret_hash not in listing
    rows = json.loads(run("list", "acme-chat", "--json")[0])
    assert [(row["prefix"], row["state"], row["tenant"]) for row in rows] == [(key.prefix, "revoked", "acme-chat")]
    assert set(rows[0]) == {
        "prefix",
        "tenant",
        "name",
        "state",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
    }
    assert run("list", "other")[0].strip() == "no API keys"


# ---- the admin ----


def test_admin_shows_a_new_key_once_and_revokes(admin_client, acme):
    tenant = acme["acme-chat"]
    response = admin_client.post(
        "/admin/xaas_tenants/apikey/add/",
        {"tenant": tenant.pk, "name": "from admin", "expires_at_0": "", "expires_at_1": ""},
        follow=True,
    )
    assert response.status_code == 200 and not response.redirect_chain  # on the POST's own page, not a message
    match = re.search(r"xk_[a-z0-9]+_[A-Za-z0-9]+", response.content.decode())
    assert match is not None
    plaintext = match.group(0)
    key = authenticate_key(plaintext)
    assert key.name == "from admin" and key.tenant_id == tenant.pk
    # Never again: neither the list nor the change page shows it.
    assert plaintext not in admin_client.get("/admin/xaas_tenants/apikey/").content.decode()
    change = admin_client.get(f"/admin/xaas_tenants/apikey/{key.pk}/change/").content.decode()
    assert plaintext not in change and key.secret_hash not in change and key.prefix in change
    response = admin_client.post(
        "/admin/xaas_tenants/apikey/", {"action": "revoke_keys", "_selected_action": [key.pk]}, follow=True
    )
    assert "1 API key(s) revoked" in response.content.decode()
    with pytest.raises(InvalidApiKey):
        authenticate_key(plaintext)


# ---- the resolver: keys resolve request.tenant for the middleware and the quota decorator ----


@pytest.fixture
def key_resolver(settings, acme):
    settings.ROOT_URLCONF = "tests.quota_urls"
    settings.METERING = {}  # the default resolver: tenants.resolvers.api_key_resolver
    return {name: create_api_key(name)[1] for name in ("acme", "acme-chat", "other")}


def bearer(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def test_the_quota_decorator_meters_the_keys_tenant(key_resolver):
    client = Client()
    assert client.get("/sync", headers=bearer(key_resolver["acme-chat"])).status_code == 200
    assert usage("acme-chat", "api_calls") == 1
    limit("acme-chat", 1, feature="api_calls")
    refused = client.get("/sync", headers=bearer(key_resolver["acme-chat"]))
    assert refused.status_code == 429 and refused.json()["error"]["tenant"] == "acme-chat"


def test_a_key_may_narrow_to_a_tenant_in_its_subtree(key_resolver):
    client = Client()
    headers = bearer(key_resolver["acme"], **{"X-Tenant-ID": "acme-chat-key-1"})
    assert client.get("/sync", headers=headers).status_code == 200
    assert usage("acme-chat-key-1", "api_calls") == 1


@pytest.mark.parametrize("named", ["other", "acme", "no-such-tenant"])
def test_a_key_cannot_name_a_tenant_outside_its_subtree(key_resolver, named):
    response = Client().get("/sync", headers=bearer(key_resolver["acme-chat"], **{"X-Tenant-ID": named}))
    assert response.status_code == 404
    assert error_of(response) == {
        "code": "unknown_tenant",
        "field": "X-Tenant-ID",
        "message": "unknown tenant: no tenant with this id is within reach of this credential",
    }
    assert named not in response.content.decode()
    assert not UsageRecord.objects.exists()


@pytest.mark.parametrize("header", ["Bearer xk_bad", "Bearer", "Bearer  ", "bearer xk_aaaaaaaa_" + "A" * 43])
def test_a_bad_key_is_401_in_the_middleware(key_resolver, header):
    response = Client().get("/sync", headers={"Authorization": header})
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert error_of(response)["code"] == "invalid_api_key"
    assert not UsageRecord.objects.exists()


def test_without_a_key_the_header_is_ignored(key_resolver, settings):
    response = Client().get("/sync", headers={"X-Tenant-ID": "acme"})
    assert response.status_code == 401 and error_of(response)["code"] == "not_authenticated"
    settings.METERING = {**settings.METERING, "API_KEY_HEADER_FALLBACK": True}  # gone: a check error, no effect
    assert Client().get("/sync", headers={"X-Tenant-ID": "acme"}).status_code == 401
    assert not UsageRecord.objects.exists()


def test_other_authorization_schemes_are_not_keys(key_resolver):
    response = Client().get("/sync", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status_code == 401 and error_of(response)["code"] == "not_authenticated"
