"""The management commands: tenant add|move|tree, usage (and usage --tree), reconcile_usage and seed_demo."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from metering import UsageEvent, get_meter
from metering.models import UsageRecord, UsageRollup
from metering.usage import get_usage
from tenants.apikeys import authenticate_key
from tenants.lineage import get_context
from tenants.models import Tenant
from tests.factories import any_backdate

pytestmark = pytest.mark.django_db

# Fixed past hours, so reconcile output is predictable; "total" usage covers them whatever today is.
HOUR_A = datetime(2024, 3, 5, 10, 15, tzinfo=UTC)
HOUR_B = datetime(2024, 3, 5, 11, 45, tzinfo=UTC)


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def record(tenant_id: str, quantity: str, feature: str = "llm_tokens", when: datetime | None = None) -> None:
    timestamp = when or datetime.now(UTC) - timedelta(seconds=1)
    get_meter().record_usage_sync(UsageEvent(tenant_id, feature, Decimal(quantity), timestamp=timestamp))


def total(tenant_id: str, feature: str = "llm_tokens") -> Decimal:
    return get_usage(tenant_id, feature, None, None)


@pytest.fixture
def acme() -> None:
    """acme > chat > key-1, key-2; acme > search; and a second root, beta."""
    run("tenant", "add", "acme", "--kind", "organization", "--name", "Acme")
    run("tenant", "add", "chat", "--parent", "acme", "--kind", "project")
    run("tenant", "add", "key-2", "--parent", "chat", "--kind", "key")  # before key-1: output sorts by id
    run("tenant", "add", "key-1", "--parent", "chat", "--kind", "key")
    run("tenant", "add", "search", "--parent", "acme", "--kind", "project")
    run("tenant", "add", "beta", "--kind", "organization", "--exempt")


# tenant add / tree


def test_add_prints_the_lineage_and_stores_the_options():
    assert run("tenant", "add", "acme", "--kind", "organization", "--name", "Acme Inc.") == "created acme\n"
    assert run("tenant", "add", "chat", "--parent", "acme", "--kind", "project") == "created acme/chat\n"
    assert run("tenant", "add", "key-1", "--parent", "chat", "--exempt") == "created acme/chat/key-1\n"
    key = Tenant.objects.get(external_id="key-1")
    assert (key.kind, key.exempt, key.depth) == ("", True, 2)
    assert Tenant.objects.values_list("name", "kind").get(external_id="acme") == ("Acme Inc.", "organization")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tenant", "add", "orphan", "--parent", "nobody"), "unknown tenant 'nobody'"),
        (("tenant", "add", "bad id!"), "external_id"),
        (("tenant", "add", "acme"), "already exists"),
        (("tenant", "move", "nobody", "--root"), "unknown tenant 'nobody'"),
        (("tenant", "tree", "nobody"), "unknown tenant 'nobody'"),
        (("tenant", "move", "chat"), "one of the arguments --parent --root is required"),
        (("tenant", "move", "chat", "--root", "--parent", "acme"), "not allowed with argument"),
        (("tenant",), "required: action"),
    ],
)
def test_errors_are_command_errors(acme, args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)


def test_tenant_tree_indents_by_depth_and_shows_the_flags(acme, django_assert_num_queries):
    record("key-1", "1.5")
    Tenant.objects.filter(external_id="search").update(is_active=False)
    with django_assert_num_queries(1):  # the tenants; usage is metering's (usage --tree)
        output = run("tenant", "tree")
    assert output.splitlines() == [
        "acme (organization)",
        "  chat (project)",
        "    key-1 (key)",
        "    key-2 (key)",
        "  search (project) [inactive]",
        "beta (organization) [exempt]",
    ]
    assert run("tenant", "tree", "chat").splitlines() == ["chat (project)", "  key-1 (key)", "  key-2 (key)"]


def test_usage_tree_indents_by_depth_and_shows_this_months_subtree_usage(acme, django_assert_num_queries):
    record("key-1", "1.5")
    record("key-2", "2")
    record("key-2", "7", feature="images")
    record("beta", "10")
    Tenant.objects.filter(external_id="search").update(is_active=False)
    with django_assert_num_queries(2):  # the tenants, then the usage of all of them
        output = run("usage", "--tree")
    assert output.splitlines() == [
        "acme (organization)  images=7 llm_tokens=3.5",
        "  chat (project)  images=7 llm_tokens=3.5",
        "    key-1 (key)  llm_tokens=1.5",
        "    key-2 (key)  images=7 llm_tokens=2",
        "  search (project) [inactive]",
        "beta (organization) [exempt]  llm_tokens=10",
    ]
    assert run("usage", "--tree", "chat").splitlines() == [
        "chat (project)  images=7 llm_tokens=3.5",
        "  key-1 (key)  llm_tokens=1.5",
        "  key-2 (key)  images=7 llm_tokens=2",
    ]
    assert run("usage", "--tree", "chat", "--feature", "images").splitlines() == [
        "chat (project)  images=7",
        "  key-1 (key)",
        "  key-2 (key)  images=7",
    ]
    assert json.loads(run("usage", "--tree", "chat", "--json")) == {
        "chat": {"images": "7", "llm_tokens": "3.5"},
        "key-1": {"llm_tokens": "1.5"},
        "key-2": {"images": "7", "llm_tokens": "2"},
    }
    assert json.loads(run("usage", "--tree", "acme", "--period", "total", "--json"))["search"] == {}


@any_backdate()
def test_usage_tree_ignores_usage_outside_this_month(acme):
    record("key-1", "4", when=HOUR_A)
    assert run("usage", "--tree", "key-1") == "key-1 (key)\n"
    assert run("usage", "--tree", "key-1", "--period", "total") == "key-1 (key)  llm_tokens=4\n"


def test_tree_of_an_empty_database():
    assert run("tenant", "tree") == "no tenants\n"
    assert run("usage", "--tree") == "no tenants\n"
    assert json.loads(run("usage", "--tree", "--json")) == {}


def test_tree_is_preorder_whatever_the_primary_keys(django_assert_num_queries):
    # Enough siblings that paths like /1/10/ and /1/2/ coexist; each child must still sit under its parent.
    run("tenant", "add", "root")
    for number in range(12):
        run("tenant", "add", f"p{number:02}", "--parent", "root")
    for number in range(12):
        run("tenant", "add", f"p{number:02}-child", "--parent", f"p{number:02}")
    lines = run("tenant", "tree").splitlines()
    expected = ["root"]
    for number in range(12):
        expected += [f"  p{number:02}", f"    p{number:02}-child"]
    assert lines == expected


# tenant move


def test_move_changes_the_lineage_and_carries_the_usage(acme, django_capture_on_commit_callbacks):
    record("key-1", "1.5")
    record("key-2", "2.25")
    assert get_context("key-1").lineage_ids == ("acme", "chat", "key-1")  # now cached
    with django_capture_on_commit_callbacks(execute=True):
        assert run("tenant", "move", "chat", "--parent", "beta") == "moved beta/chat\n"
    assert get_context("key-1").lineage_ids == ("beta", "chat", "key-1")
    assert (total("acme"), total("beta"), total("chat")) == (Decimal(0), Decimal("3.75"), Decimal("3.75"))
    with django_capture_on_commit_callbacks(execute=True):
        assert run("tenant", "move", "chat", "--root") == "moved chat\n"
    assert get_context("key-2").lineage_ids == ("chat", "key-2")
    assert (total("beta"), total("chat")) == (Decimal(0), Decimal("3.75"))


@pytest.mark.parametrize(("tenant_id", "parent"), [("acme", "key-1"), ("chat", "chat"), ("acme", "chat")])
def test_a_cycle_is_a_command_error_and_changes_nothing(acme, tenant_id, parent):
    paths = dict(Tenant.objects.values_list("external_id", "path"))
    with pytest.raises(CommandError, match="cannot"):
        run("tenant", "move", tenant_id, "--parent", parent)
    assert dict(Tenant.objects.values_list("external_id", "path")) == paths


# usage


def test_usage_json_is_the_exact_subtree_sum_per_feature(acme):
    record("key-1", "1.5")
    record("key-2", "2.25")
    record("key-2", "0.000001")
    record("search", "3", feature="images")
    record("beta", "100")  # another tree
    assert json.loads(run("usage", "acme", "--json")) == {"images": "3", "llm_tokens": "3.750001"}
    assert json.loads(run("usage", "chat", "--json")) == {"llm_tokens": "3.750001"}
    assert json.loads(run("usage", "acme", "--feature", "images", "--json")) == {"images": "3"}
    assert json.loads(run("usage", "key-1", "--feature", "images", "--json")) == {"images": "0"}
    assert json.loads(run("usage", "search", "--json", "--period", "total")) == {"images": "3"}
    sums = {
        feature: sum((record.quantity for record in UsageRecord.objects.filter(feature=feature)), Decimal(0))
        for feature in ("images", "llm_tokens")
    }
    assert Decimal(json.loads(run("usage", "beta", "--json"))["llm_tokens"]) == Decimal(100)
    assert sums == {"images": Decimal(3), "llm_tokens": Decimal("103.750001")}


@any_backdate()
def test_usage_periods_use_the_window_holding_now(acme):
    record("key-1", "10")
    record("key-1", "5", when=HOUR_A)
    assert json.loads(run("usage", "acme", "--json", "--period", "hour")) == {"llm_tokens": "10"}
    assert json.loads(run("usage", "acme", "--json", "--period", "day")) == {"llm_tokens": "10"}
    assert json.loads(run("usage", "acme", "--json")) == {"llm_tokens": "10"}
    assert json.loads(run("usage", "acme", "--json", "--period", "total")) == {"llm_tokens": "15"}
    assert json.loads(run("usage", "acme", "--json", "--period", "total", "--feature", "llm_tokens")) == {
        "llm_tokens": "15"
    }


def test_usage_prints_a_table(acme):
    record("key-1", "1234.5")
    lines = run("usage", "chat").splitlines()
    assert lines[0].startswith("usage of chat and its subtree, month: ")
    assert lines[1:] == ["feature     quantity", "llm_tokens    1234.5"]
    assert run("usage", "search").splitlines()[1:] == ["no usage"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("usage", "nobody"), "unknown tenant 'nobody'"),
        (("usage", "acme", "--feature", "bad name"), "feature_name"),
        (("usage", "acme", "--period", "week"), "invalid choice"),
        (("usage",), "tenant_id argument is required"),
        (("usage", "--tree", "nobody"), "unknown tenant 'nobody'"),
        (("usage", "--tree", "--feature", "bad name"), "feature_name"),
    ],
)
def test_usage_errors_are_command_errors(acme, args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)


# reconcile_usage


@pytest.fixture
def corrupted(acme) -> dict[str, Decimal]:
    """Facts in two hours; acme's HOUR_A row says 999, key-1's HOUR_B row is gone. Returns the true totals."""
    with any_backdate():
        record("key-1", "1.5", when=HOUR_A)
        record("key-2", "2", when=HOUR_A)
        record("key-1", "0.25", when=HOUR_B)
    acme_pk = Tenant.objects.get(external_id="acme").pk
    key_pk = Tenant.objects.get(external_id="key-1").pk
    hour_a, hour_b = HOUR_A.replace(minute=0), HOUR_B.replace(minute=0)
    assert UsageRollup.objects.filter(tenant_id=acme_pk, bucket=hour_a).update(units=999_000_000) == 1
    assert UsageRollup.objects.filter(tenant_id=key_pk, bucket=hour_b).delete()[0] == 1
    return {"acme": Decimal("3.75"), "chat": Decimal("3.75"), "key-1": Decimal("1.75"), "key-2": Decimal(2)}


NO_DRIFT_FOUND = "0 live counters found drifting from the rollups"
NO_DRIFT_REPAIRED = "0 live counters repaired drifting from the rollups"
DIFFERENCES = [
    "acme llm_tokens 2024-03-05 10:00 UTC: 999 -> 3.5",
    "key-1 llm_tokens 2024-03-05 11:00 UTC: 0 -> 0.25 (0 -> 1 events)",
]


def test_reconcile_reports_and_repairs_exactly_the_differences(corrupted, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        output = run("reconcile_usage")
    assert output.splitlines() == [*DIFFERENCES, "2 differences repaired in 2 trees", NO_DRIFT_REPAIRED]
    for tenant_id, expected in corrupted.items():
        assert total(tenant_id) == expected
        assert get_usage(tenant_id, "llm_tokens", HOUR_A, HOUR_B + timedelta(minutes=1)) == expected
    with django_capture_on_commit_callbacks(execute=True):
        assert run("reconcile_usage") == f"0 differences repaired in 2 trees\n{NO_DRIFT_REPAIRED}\n"


def test_reconcile_dry_run_reports_without_fixing(corrupted, django_capture_on_commit_callbacks):
    rows = list(UsageRollup.objects.order_by("pk").values_list("tenant_id", "bucket", "units", "events"))
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        output = run("reconcile_usage", "acme", "--dry-run")
    assert output.splitlines() == [*DIFFERENCES, "2 differences found in 1 trees", NO_DRIFT_FOUND]
    assert callbacks == []
    assert list(UsageRollup.objects.order_by("pk").values_list("tenant_id", "bucket", "units", "events")) == rows
    assert run("reconcile_usage", "acme", "--dry-run").splitlines()[-2] == "2 differences found in 1 trees"


def test_reconcile_only_the_trees_named(corrupted):
    assert run("reconcile_usage", "beta") == f"0 differences repaired in 1 trees\n{NO_DRIFT_REPAIRED}\n"
    assert total("acme") != corrupted["acme"]


@pytest.mark.parametrize(
    ("root_id", "message"), [("nobody", "unknown tenant 'nobody'"), ("chat", "'chat' is not a root")]
)
def test_reconcile_refuses_what_is_not_a_root(acme, root_id, message):
    with pytest.raises(CommandError, match=message):
        run("reconcile_usage", root_id)


@any_backdate()
def test_reconcile_drops_the_redis_counters_built_from_bad_rollups(redis_cache, django_capture_on_commit_callbacks):
    run("tenant", "add", "acme")
    run("tenant", "add", "key-1", "--parent", "acme")
    record("key-1", "1.5", when=HOUR_A)
    UsageRollup.objects.filter(tenant__external_id="acme").update(units=7_000_000)
    assert total("acme") == Decimal(7)  # a counter, now built from the bad row
    with django_capture_on_commit_callbacks(execute=True):
        run("reconcile_usage")
    assert total("acme") == Decimal("1.5")


# seed_demo


def test_seed_demo_is_idempotent_and_prints_the_login(monkeypatch):
    from project.management.commands import seed_demo

    monkeypatch.setenv("DEMO_ADMIN_PASSWORD", "demo-password-1")
    first = run("seed_demo")
    facts = len(seed_demo.TODAY) + seed_demo.HISTORY_DAYS * len(seed_demo.HISTORY)
    counts = (Tenant.objects.count(), UsageRecord.objects.count(), get_user_model().objects.count())
    assert counts == (9, facts, 2)  # the superuser and the tenant-scoped administrator of acme-chat
    assert get_context("acme-search-key-2").lineage_ids == ("acme", "acme-search", "acme-search-key-2")
    assert get_context("internal-batch").exempt
    assert "http://127.0.0.1:8000/admin/" in first
    assert "username: admin" in first
    assert "password: demo-password-1" in first
    assert "X-Tenant-ID: acme-chat-key-1" in first
    demo_key = re.search(r"/demo/completions -H 'Authorization: Bearer (xk_\w+)'", first)
    assert demo_key is not None and authenticate_key(demo_key.group(1)).tenant.external_id == "acme-chat"
    assert '{"prompt": "hello metered world"}' in first
    assert f"usage events: {facts} recorded, 0 already there" in first
    assert f"quotas: {len(seed_demo.QUOTAS)} created" in first

    monkeypatch.delenv("DEMO_ADMIN_PASSWORD")
    second = run("seed_demo", "--port", "8123")
    assert (Tenant.objects.count(), UsageRecord.objects.count(), get_user_model().objects.count()) == counts
    assert "tenants: 0 created" in second
    assert f"usage events: 0 recorded, {facts} already there" in second
    assert "quotas: 0 created" in second
    assert "http://127.0.0.1:8123/admin/" in second and ":8000" not in second
    # An existing user is never changed: the first run's password still logs in, no new one is printed.
    assert "password: (unchanged" in second
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.is_staff and admin.check_password("demo-password-1")
    assert get_user_model().objects.get(username="chat-admin").check_password("demo-password-1")


@pytest.mark.django_db
def test_seed_demo_keeps_an_operators_revocations():
    from django.contrib.auth.models import Group

    run("seed_demo")
    group = Group.objects.get(name="Tenant administrators")
    revoked = group.permissions.get(codename="delete_quotalimit")
    group.permissions.remove(revoked)
    scoped = get_user_model().objects.get(username="chat-admin")
    scoped.groups.clear()
    run("seed_demo")
    assert not group.permissions.filter(codename="delete_quotalimit").exists()
    assert not scoped.groups.exists()


@pytest.mark.django_db
def test_seed_demo_never_changes_an_existing_user():
    user = get_user_model().objects.create_user("admin", password="mine-0123456789", is_staff=False)
    out = run("seed_demo")
    user.refresh_from_db()
    assert user.check_password("mine-0123456789") and not user.is_superuser and not user.is_staff
    assert "password: (unchanged" in out


@pytest.mark.django_db
def test_seed_demo_quotas_show_every_state_and_refuse_within_a_few_requests():
    from django.test import Client

    from quotas.models import QuotaLimit

    out = run("seed_demo")
    key = re.search(r"API key of acme-chat \(shown once\): (\S+)", out).group(1)
    enforcements = set(QuotaLimit.objects.values_list("enforcement", flat=True))
    assert enforcements == {"hard", "soft"}
    assert QuotaLimit.objects.filter(tenant__exempt=True).exists()  # an exempt subtree with a (passed) limit
    headers = {"Authorization": f"Bearer {key}", "X-Tenant-ID": "acme-chat-key-1"}
    codes = [
        Client()
        .post("/demo/completions", {"prompt": "hello metered world"}, content_type="application/json", headers=headers)
        .status_code
        for _ in range(6)
    ]
    assert codes == [200, 200, 200, 200, 429, 429]  # the printed loop (5 calls) ends on a 429
    # The exempt subtree is over its daily limit (5,000 of 4,000) and still admitted; acme-search's soft limit is
    # passed and warns only.
    from quotas.handler import QuotaPolicyHandler

    assert QuotaPolicyHandler(get_context("internal-batch")).check("llm_tokens", 100).allowed
    soft = QuotaPolicyHandler(get_context("acme-search-key-1")).check("llm_tokens", 100)
    assert soft.allowed and any(not status.hard and status.remaining <= 0 for status in soft.statuses)


@pytest.mark.django_db
def test_seed_demo_issues_a_working_api_key_and_a_scoped_administrator():
    import re

    from django.test import Client

    from tenants.models import ApiKey, TenantAdminScope

    call_command("seed_demo", stdout=io.StringIO())
    out = io.StringIO()
    call_command("seed_demo", stdout=out)
    key = re.search(r"API key of acme-chat \(shown once\): (\S+)", out.getvalue()).group(1)
    assert ApiKey.objects.filter(name="demo", revoked_at__isnull=True).count() == 1  # the first run's key is revoked
    response = Client().get(
        "/api/v1/usage?tenant_id=acme-chat-key-1&feature=llm_tokens", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200
    assert TenantAdminScope.objects.get(user__username="chat-admin").tenant.external_id == "acme-chat"
