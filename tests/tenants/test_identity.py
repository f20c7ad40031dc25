"""Who a request acts for (issue 10, item 1) and what a caller without rights learns (the oracles of item 3).

The isolation matrix: every enforcement point (the demo endpoints, ``@enforce_quota`` sync and async, over WSGI and
ASGI, ``QuotaMiddleware``, ``QuotaPermission``) x every way of claiming a tenant without the right to it. Each
refusal is checked for its status and body, and for having written and spent nothing: no usage fact, no rollup, no
reservation, every quota as unused as before. Then the system checks, the demo key, ``visible_from`` and timing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.checks import run_checks
from django.core.management import call_command
from django.db import connection
from django.test import AsyncClient, Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from metering.models import UsageRecord, UsageRollup
from quotas.handler import QuotaPolicyHandler
from quotas.models import QuotaReservation
from tenants.apikeys import authenticate_key, create_api_key, revoke
from tenants.exceptions import InactiveTenant, UnknownTenant
from tenants.lineage import get_context, invalidate
from tenants.middleware import resolve_tenant
from tenants.models import Tenant
from tenants.resolvers import key_context
from tests.factories import tree, usage
from tests.identity_helpers import TRUSTED_HEADER, bearer
from tests.quota_helpers import limit
from tests.timing import interleaved_medians, ratio

pytestmark = pytest.mark.django_db(transaction=True)

TREE = {
    "acme": None,
    "acme-chat": "acme",  # the key's tenant
    "acme-chat-key-1": "acme-chat",  # a child in its subtree
    "acme-chat-off": "acme-chat",  # deactivated, in its subtree
    "acme-search": "acme",  # a sibling
    "other": None,  # another tree
    "other-project": "other",
    "internal": None,  # exempt
    "internal-batch": "internal",
    "dead": None,  # deactivated, another tree
}
ROUTES = [{"url_name": "routed-by-name", "feature": "api_calls"}]
PROMPT = json.dumps({"prompt": "one two three"})


@dataclass(frozen=True)
class Point:
    """An enforcement point: how to call it, with what feature and quantity."""

    name: str
    urlconf: str
    path: str
    feature: str
    quantity: int
    asgi: bool = False
    post: bool = False

    def call(self, headers: dict[str, str]) -> Any:
        if self.asgi:
            client: Any = AsyncClient()
            method = client.post if self.post else client.get
            body = {"data": PROMPT, "content_type": "application/json"} if self.post else {}
            return async_to_sync(method)(self.path, headers=headers, **body)
        if self.post:
            return Client().post(self.path, PROMPT, content_type="application/json", headers=headers)
        return Client().get(self.path, headers=headers)


POINTS = [
    Point("demo", "project.urls", "/demo/completions", "llm_tokens", 3, post=True),
    Point("demo-async", "project.urls", "/demo/completions-async", "llm_tokens", 3, post=True, asgi=True),
    Point("enforce_quota", "tests.quota_urls", "/sync", "api_calls", 1),
    Point("enforce_quota-async", "tests.quota_urls", "/async", "api_calls", 2),
    Point("enforce_quota-async-asgi", "tests.quota_urls", "/async", "api_calls", 2, asgi=True),
    Point("QuotaMiddleware", "tests.quota_urls", "/routed/by-name", "api_calls", 1),
    Point("QuotaPermission", "tests.quota_urls", "/drf-permission", "api_calls", 1),
]


@pytest.fixture(params=POINTS, ids=[point.name for point in POINTS])
def point(request, settings) -> Point:
    settings.ROOT_URLCONF = request.param.urlconf
    return request.param


@pytest.fixture
def world(settings) -> dict[str, str]:
    """The forest, a quota of 100 on every feature at every root, and the keys: by role, as plaintext."""
    settings.METERING = {"QUOTA_ROUTES": ROUTES}  # the default resolver: tenants.resolvers.api_key_resolver
    tree(TREE)
    Tenant.objects.filter(external_id="internal").update(exempt=True)
    Tenant.objects.filter(external_id__in=["acme-chat-off", "dead"]).update(is_active=False)
    invalidate(TREE)
    for root in ("acme", "other", "internal"):
        for feature in ("api_calls", "llm_tokens"):
            limit(root, 100, feature=feature)
    revoked_key = create_api_key("acme-chat", name="revoked")[1]
    revoke(revoked_key.split("_")[1])
    expired = create_api_key("acme-chat", name="expired", expires_at=timezone.now() - timedelta(seconds=1))[1]
    return {
        "key": create_api_key("acme-chat", name="project")[1],
        "foreign": create_api_key("other", name="foreign")[1],
        "revoked": revoked_key,
        "expired": expired,
    }


def named(tenant_id: str) -> dict[str, str]:
    return {"X-Tenant-ID": tenant_id}


# A host project's own bearer token (a JWT): not one of our keys, so no credential to the quotas.
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhY21lLWNoYXQifQ.c2lnbmF0dXJl"

# (case, headers from the keys, status, code). Every case but the last two is refused.
NO_CREDENTIAL: list[tuple[str, Callable[[dict[str, str]], dict[str, str]]]] = [
    ("nothing", lambda keys: {}),
    ("header: own tree", lambda keys: named("acme-chat-key-1")),
    ("header: key's own tenant", lambda keys: named("acme-chat")),
    ("header: other tree", lambda keys: named("other-project")),
    ("header: exempt tenant", lambda keys: named("internal-batch")),
    ("header: unknown", lambda keys: named("no-such-tenant")),
    ("header: deactivated", lambda keys: named("dead")),
    ("Basic + header", lambda keys: {"Authorization": "Basic dXNlcjpwYXNz", **named("acme-chat-key-1")}),
    ("Token + header", lambda keys: {"Authorization": f"Token {keys['key']}", **named("acme-chat")}),
    ("key as X-Api-Key + header", lambda keys: {"X-Api-Key": keys["key"], **named("acme-chat")}),
    ("host JWT Bearer + header", lambda keys: {"Authorization": f"Bearer {JWT}", **named("acme-chat")}),
]
BAD_KEY: list[tuple[str, Callable[[dict[str, str]], dict[str, str]]]] = [
    ("malformed Bearer", lambda keys: {"Authorization": "Bearer xk_nope", **named("acme-chat")}),
    ("empty Bearer", lambda keys: {"Authorization": "Bearer ", **named("acme-chat")}),
    ("wrong secret", lambda keys: bearer(keys["key"][:-4] + "AAAA", **named("acme-chat"))),
    ("revoked key", lambda keys: bearer(keys["revoked"])),
    ("revoked key + header", lambda keys: bearer(keys["revoked"], **named("acme-chat-key-1"))),
    ("expired key", lambda keys: bearer(keys["expired"])),
]
OUT_OF_REACH: list[tuple[str, Callable[[dict[str, str]], dict[str, str]]]] = [
    ("foreign key + our tenant", lambda keys: bearer(keys["foreign"], **named("acme-chat-key-1"))),
    ("key + foreign tenant", lambda keys: bearer(keys["key"], **named("other-project"))),
    ("key + foreign root", lambda keys: bearer(keys["key"], **named("other"))),
    ("key + sibling", lambda keys: bearer(keys["key"], **named("acme-search"))),
    ("key + ancestor", lambda keys: bearer(keys["key"], **named("acme"))),
    ("key + unknown id", lambda keys: bearer(keys["key"], **named("no-such-tenant"))),
    ("key + deactivated foreign", lambda keys: bearer(keys["key"], **named("dead"))),
    ("key + exempt tenant", lambda keys: bearer(keys["key"], **named("internal-batch"))),
]
ALLOWED: list[tuple[str, Callable[[dict[str, str]], dict[str, str]], str]] = [
    ("key alone", lambda keys: bearer(keys["key"]), "acme-chat"),
    ("key + child in its subtree", lambda keys: bearer(keys["key"], **named("acme-chat-key-1")), "acme-chat-key-1"),
    ("foreign key alone", lambda keys: bearer(keys["foreign"]), "other"),
]
WATCHED = ["acme", "acme-chat", "acme-chat-key-1", "acme-search", "other", "other-project", "internal-batch"]


def assert_nothing_written_or_spent() -> None:
    assert UsageRecord.objects.count() == 0
    assert UsageRollup.objects.count() == 0
    assert QuotaReservation.objects.count() == 0
    for tenant_id in WATCHED:
        assert usage(tenant_id, "api_calls") == 0 and usage(tenant_id, "llm_tokens") == 0, tenant_id
        for feature in ("api_calls", "llm_tokens"):
            statuses = QuotaPolicyHandler(get_context(tenant_id, require_active=False)).check(feature).statuses
            assert all(status.used == 0 for status in statuses), (tenant_id, feature, statuses)


def error(response) -> dict[str, Any]:
    return json.loads(response.content)["error"]


@pytest.mark.parametrize(("case", "headers"), NO_CREDENTIAL, ids=[case for case, _ in NO_CREDENTIAL])
def test_without_a_usable_credential_every_point_answers_the_same_401(world, point, case, headers):
    response = point.call(headers(world))
    assert response.status_code == 401, response.content
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert error(response) == {
        "code": "not_authenticated",
        "field": "Authorization",
        "message": "authentication required: send 'Authorization: Bearer <API key>'",
    }
    assert_nothing_written_or_spent()


def test_a_host_views_own_bearer_token_passes_the_tenant_middleware_untouched(world, settings):
    """Host views that authenticate a JWT themselves keep working with TenantMiddleware installed: only ``xk_``
    tokens are ours (a malformed one is still a 401 ``invalid_api_key``)."""
    settings.ROOT_URLCONF = "tests.urls"
    response = Client().get("/whoami", headers={"Authorization": f"Bearer {JWT}", **named("acme-chat")})
    assert response.status_code == 200 and response.json() == {"tenant": None}
    assert_nothing_written_or_spent()


def test_without_a_credential_the_401_is_byte_for_byte_the_same_whatever_is_named(world, point):
    bodies = {case: point.call(headers(world)).content for case, headers in NO_CREDENTIAL}
    assert len(set(bodies.values())) == 1, bodies
    assert not any(tenant_id in next(iter(bodies.values())).decode() for tenant_id in TREE)


@pytest.mark.parametrize(("case", "headers"), BAD_KEY, ids=[case for case, _ in BAD_KEY])
def test_a_bad_revoked_or_expired_key_is_401_and_spends_nothing(world, point, case, headers):
    response = point.call(headers(world))
    assert response.status_code == 401, response.content
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert error(response)["code"] == "invalid_api_key" and error(response)["field"] == "Authorization"
    assert not any(f"'{tenant_id}'" in response.content.decode() for tenant_id in TREE)
    assert_nothing_written_or_spent()


@pytest.mark.parametrize(("case", "headers"), OUT_OF_REACH, ids=[case for case, _ in OUT_OF_REACH])
def test_a_tenant_out_of_the_keys_reach_is_the_same_404_as_an_unknown_one(world, point, case, headers):
    sent = headers(world)
    response = point.call(sent)
    assert response.status_code == 404, response.content
    assert error(response) == {
        "code": "unknown_tenant",
        "field": "X-Tenant-ID",
        "message": "unknown tenant: no tenant with this id is within reach of this credential",
    }
    assert sent["X-Tenant-ID"] not in response.content.decode()  # not even the id it sent is echoed
    assert_nothing_written_or_spent()


def test_every_out_of_reach_answer_is_byte_for_byte_the_same(world, point):
    answers = {case: point.call(headers(world)) for case, headers in OUT_OF_REACH}
    assert {(answer.status_code, answer.content) for answer in answers.values()} == {
        (404, answers["key + unknown id"].content)
    }
    assert_nothing_written_or_spent()


def test_a_deactivated_tenant_inside_the_keys_subtree_is_403(world, point):
    response = point.call(bearer(world["key"], **named("acme-chat-off")))
    assert response.status_code == 403
    assert error(response)["code"] == "inactive_tenant"
    assert_nothing_written_or_spent()


@pytest.mark.parametrize(("case", "headers", "charged"), ALLOWED, ids=[case for case, _, _ in ALLOWED])
def test_a_key_acts_for_its_tenant_or_a_tenant_of_its_subtree(world, point, case, headers, charged):
    response = point.call(headers(world))
    assert response.status_code == 200, response.content
    assert usage(charged, point.feature) == point.quantity
    assert UsageRecord.objects.get().tenant.external_id == charged


def test_a_deactivated_ancestor_above_the_key_is_never_named(world, settings):
    settings.ROOT_URLCONF = "tests.quota_urls"
    Tenant.objects.filter(external_id="acme").update(is_active=False)
    invalidate(TREE)
    for headers in (bearer(world["key"]), bearer(world["key"], **named("acme-chat-key-1"))):
        response = Client().get("/sync", headers=headers)
        assert response.status_code == 403
        assert error(response)["code"] == "inactive_tenant"
        assert "'acme'" not in response.content.decode()
        assert "above" in error(response)["message"]
    assert_nothing_written_or_spent()


def test_a_deactivated_level_of_the_keys_own_subtree_is_named(world, settings):
    settings.ROOT_URLCONF = "tests.quota_urls"
    tree({"acme-chat-off-leaf": "acme-chat-off"})
    response = Client().get("/sync", headers=bearer(world["key"], **named("acme-chat-off-leaf")))
    assert response.status_code == 403
    assert error(response)["message"] == "tenant 'acme-chat-off-leaf' is inactive (deactivated at 'acme-chat-off')"


# ---- the resolvers' contexts: visible_from is the credential's level ----


def request_with(headers: dict[str, str]):
    return RequestFactory().get("/", headers=headers)


def test_a_keys_context_is_seen_from_the_keys_tenant(world):
    own = resolve_tenant(request_with(bearer(world["key"])))
    assert own is not None and own.lineage_ids == ("acme", "acme-chat") and own.visible_from == 1
    narrowed = resolve_tenant(request_with(bearer(world["key"], **named("acme-chat-key-1"))))
    assert narrowed is not None and narrowed.tenant_id == "acme-chat-key-1"
    assert narrowed.visible_from == 1 and [level.tenant_id for level in narrowed.visible_levels] == [
        "acme-chat",
        "acme-chat-key-1",
    ]


def test_the_header_resolvers_context_is_seen_from_the_named_tenant(world, settings):
    settings.METERING = TRUSTED_HEADER
    context = resolve_tenant(request_with(named("acme-chat-key-1")))
    assert context is not None and context.visible_from == 2
    assert [level.tenant_id for level in context.visible_levels] == ["acme-chat-key-1"]


def test_a_resolver_returning_a_tenant_id_gets_a_context_seen_from_that_tenant(world, settings):
    settings.METERING = {"TENANT_RESOLVER": "tests.urls.query_resolver"}
    context = resolve_tenant(RequestFactory().get("/?tenant=acme-chat-key-1"))
    assert context is not None and context.visible_from == 2
    with pytest.raises(UnknownTenant) as unknown:
        resolve_tenant(RequestFactory().get("/?tenant=no-such-tenant"))
    assert "no-such-tenant" not in str(unknown.value)


# ---- the bare-header resolver: development and trusted gateways only ----


def test_the_header_resolver_ignores_the_header_with_debug_off_unless_acknowledged(world, settings, caplog):
    settings.ROOT_URLCONF = "tests.quota_urls"
    settings.METERING = {"TENANT_RESOLVER": "tenants.resolvers.header_resolver"}
    with caplog.at_level("ERROR", logger="tenants.resolvers"):
        response = Client().get("/sync", headers=named("acme-chat-key-1"))
    assert response.status_code == 401 and error(response)["code"] == "not_authenticated"
    assert_nothing_written_or_spent()
    settings.DEBUG = True
    assert Client().get("/sync", headers=named("acme-chat-key-1")).status_code == 200
    settings.DEBUG = False
    settings.METERING = TRUSTED_HEADER
    assert Client().get("/sync", headers=named("acme-chat-key-1")).status_code == 200
    assert usage("acme-chat-key-1", "api_calls") == 2


def test_the_trusted_header_names_no_deactivated_level_above_the_named_tenant(world, settings):
    settings.ROOT_URLCONF = "tests.quota_urls"
    settings.METERING = TRUSTED_HEADER
    Tenant.objects.filter(external_id="acme").update(is_active=False)
    invalidate(TREE)
    response = Client().get("/sync", headers=named("acme-chat-key-1"))
    assert response.status_code == 403
    assert error(response)["message"] == "tenant 'acme-chat-key-1' is inactive (a tenant above it is deactivated)"
    unknown = Client().get("/sync", headers=named("no-such-tenant"))
    assert unknown.status_code == 404 and "no-such-tenant" not in unknown.content.decode()


# ---- system checks ----


def check_ids() -> set[str]:
    return {message.id for message in run_checks() if message.id and message.id.startswith("xaas_tenants")}


def test_a_leftover_header_fallback_is_a_check_error_saying_what_to_do(settings):
    settings.METERING = {"TENANT_RESOLVER": "tenants.resolvers.api_key_resolver", "API_KEY_HEADER_FALLBACK": True}
    (message,) = [m for m in run_checks() if m.id == "xaas_tenants.E003"]
    assert "Authorization: Bearer" in str(message.hint) and "TRUST_TENANT_HEADER" in str(message.hint)
    settings.METERING = {"API_KEY_HEADER_FALLBACK": False}
    assert check_ids() == {"xaas_tenants.W002"}


def test_the_header_resolver_with_debug_off_is_a_check_error_unless_acknowledged(settings):
    settings.METERING = {"TENANT_RESOLVER": "tenants.resolvers.header_resolver"}
    settings.DEBUG = False
    (message,) = [m for m in run_checks() if m.id == "xaas_tenants.E004"]
    assert message.is_serious() and "TRUST_TENANT_HEADER" in str(message.hint)
    settings.DEBUG = True
    assert check_ids() == set()
    settings.DEBUG = False
    settings.METERING = TRUSTED_HEADER
    assert check_ids() == set()
    settings.METERING = {}
    assert check_ids() == set()  # the default: API keys


# ---- the example project's demo key ----


def test_seed_demo_prints_a_working_demo_key_and_revokes_the_previous_one(settings, tmp_path):
    import io

    settings.VAR_DIR = tmp_path

    def seed() -> str:
        out = io.StringIO()
        call_command("seed_demo", stdout=out)
        match = re.search(r"/demo/completions -H 'Authorization: Bearer (xk_\w+)'", out.getvalue())
        assert match is not None, out.getvalue()
        assert (tmp_path / "demo-api-key").read_text().strip() == match.group(1)
        assert (os.stat(tmp_path / "demo-api-key").st_mode & 0o777) == 0o600
        return match.group(1)

    def demo(key: str):
        headers = bearer(key, **named("acme-chat-key-1"))
        return Client().post("/demo/completions", PROMPT, content_type="application/json", headers=headers)

    first = seed()
    before = usage("acme-chat-key-1")
    assert demo(first).status_code == 200
    assert usage("acme-chat-key-1") == before + 3
    second = seed()
    assert demo(first).status_code == 401
    assert demo(second).status_code == 200
    assert authenticate_key(second).tenant.external_id == "acme-chat"
    assert Client().post("/demo/completions", PROMPT, content_type="application/json").status_code == 401


# ---- timing: an id outside the subtree costs what an unknown id costs ----


def test_narrowing_costs_the_same_queries_whether_the_id_exists_elsewhere_or_not(world):
    get_context("other-project")  # a cached foreign lineage must not answer faster than the database
    get_context("dead", require_active=False)
    resolve_tenant(request_with(bearer(world["key"])))  # last_used_at written once: out of the way
    shapes = {}
    for tenant_id in ("other-project", "dead", "acme", "no-such-tenant", "internal-batch"):
        with CaptureQueriesContext(connection) as queries, pytest.raises(UnknownTenant):
            resolve_tenant(request_with(bearer(world["key"], **named(tenant_id))))
        shapes[tenant_id] = [query["sql"].replace(f"'{tenant_id}'", "<named>") for query in queries.captured_queries]
    assert len({json.dumps(shape) for shape in shapes.values()}) == 1, shapes
    # The key, the key's own lineage (unless cached), the subtree: the named id is read by one query, the last.
    named_reads = [index for index, sql in enumerate(shapes["no-such-tenant"]) if "<named>" in sql]
    assert named_reads == [len(shapes["no-such-tenant"]) - 1] and len(shapes["no-such-tenant"]) <= 3


def test_narrowing_takes_the_same_time_whether_the_id_exists_elsewhere_or_not(world):
    """Medians of many interleaved narrowings (the step after the key is checked): a foreign id whose lineage is
    cached against an unknown id. The old resolver read the named lineage first: a cache hit for the foreign id, a
    query for the unknown one, several times slower; here both are the one subtree query."""
    key = authenticate_key(world["key"])
    get_context("other-project")
    get_context("acme-chat")

    def narrow(tenant_id: str) -> None:
        with pytest.raises(UnknownTenant):
            key_context(key, tenant_id)

    medians = interleaved_medians(narrow, ["other-project", "no-such-tenant"], 500)
    assert ratio(medians) < 1.5, medians


def test_without_a_key_the_header_costs_no_query_at_all(world):
    for tenant_id in ("acme-chat", "no-such-tenant", "dead"):
        with CaptureQueriesContext(connection) as queries:
            assert resolve_tenant(request_with(named(tenant_id))) is None
        assert queries.captured_queries == []


def test_python_callers_keep_the_full_picture(world):
    with pytest.raises(InactiveTenant, match="deactivated at 'dead'"):
        get_context("dead")
    assert get_context("acme-chat-key-1").visible_from == 0
    assert QuotaPolicyHandler("acme-chat-key-1").check("api_calls", Decimal(1)).allowed


# ---- a stale cached lineage (a move or a reused id whose invalidation is not seen yet) ----


def test_a_stale_cached_lineage_is_read_again_not_a_wrong_answer_or_a_500(redis_cache):
    from tenants import lineage
    from tenants.tree import move_tenant

    tree({"a": None, "b": None, "x": "b", "k": "a"})
    key = authenticate_key(create_api_key("a", name="a")[1])
    stale_x = lineage._load_lineage("x")  # cached under b, before x moves into the key's subtree
    move_tenant("x", "a")
    lineage._cache_call("set", lineage._cache_key("x"), stale_x, 300)
    assert key_context(key, "x").lineage_ids == ("a", "x")
    # The key's own id deleted and reused by a new tenant, the old lineage still cached (it was a StopIteration).
    stale_k = lineage._load_lineage("k")
    Tenant.objects.filter(external_id="k").delete()
    tree({"k": "b"})
    lineage._cache_call("set", lineage._cache_key("k"), stale_k, 300)
    reused = authenticate_key(create_api_key("k", name="k2")[1])
    assert key_context(reused, None).lineage_ids == ("b", "k")
