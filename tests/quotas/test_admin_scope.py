"""The admin of tenant-scoped staff (only their subtree; no raising their own or an ancestor's limits), and the
tree, usage bars and usage charts as the server renders them (no browser: see test_admin_browser.py)."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from metering.events import utcnow
from metering.models import UsageOutbox, UsageRecord, UsageRollup
from quotas.models import QuotaLimit, QuotaReservation
from tenants.apikeys import create_api_key
from tenants.models import Tenant, TenantAdminScope
from tenants.tree import create_tenant
from tests.admin_fixtures import build_forest, record_days_ago, staff_user, superuser
from tests.factories import record
from tests.quota_helpers import limit

pytestmark = pytest.mark.django_db


def url(model: str, action: str, *args: object) -> str:
    app = {"tenant": "xaas_tenants", "apikey": "xaas_tenants", "tenantadminscope": "xaas_tenants"}.get(model)
    app = app or ("xaas_quotas" if model.startswith("quota") else "xaas_metering")
    return reverse(f"admin:{app}_{model}_{action}", args=args)


def pk(tenant_id: str) -> int:
    return Tenant.objects.get(external_id=tenant_id).pk


def listed_pks(response) -> set[int]:
    """Primary keys of the rows of a changelist page (the action checkboxes)."""
    assert response.status_code == 200
    return {int(value) for value in re.findall(r'name="_selected_action" value="(\d+)"', response.content.decode())}


def linked_pks(response, model: str) -> set[int]:
    """Primary keys of the rows of a read-only changelist (no actions: the rows' links)."""
    assert response.status_code == 200
    return {int(value) for value in re.findall(rf"/{model}/(\d+)/change/", response.content.decode())}


INLINE = {"quota_limits-TOTAL_FORMS": "0", "quota_limits-INITIAL_FORMS": "0", "quota_limits-MIN_NUM_FORMS": "0"}


def login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def forest():
    tenants = build_forest()
    for tenant_id in ("acme-chat-key-1", "acme-chat-key-2", "acme-search-key-1", "other-project"):
        record(tenant_id, 10)
    return tenants


@pytest.fixture
def chat_admin(forest) -> Client:
    """Staff bound to acme-chat: sees acme-chat, acme-chat-key-1, acme-chat-key-2."""
    return login(staff_user("chat-admin", "acme-chat"))


SUBTREE = {"acme-chat", "acme-chat-key-1", "acme-chat-key-2"}
OUTSIDE = {"acme", "acme-search", "acme-search-key-1", "other", "other-project"}


def assert_hidden(response, *secrets: str) -> None:
    """An object outside the scope answers like a missing one: a redirect to the admin index, nothing leaked."""
    assert response.status_code == 302, response.status_code
    assert response["Location"] == reverse("admin:index")
    for secret in secrets:
        assert secret not in response.content.decode()


# ---- what a scoped administrator sees ----


def test_the_tree_lists_only_the_subtree(chat_admin):
    response = chat_admin.get(url("tenant", "changelist"))
    assert listed_pks(response) == {pk(t) for t in SUBTREE}
    html = response.content.decode()
    for tenant_id in ("acme-search", "other-project", ">other<"):
        assert tenant_id not in html
    # Breadcrumbs start at the scope: no link to the ancestor acme.
    assert url("tenant", "change", pk("acme")) not in html
    assert 'data-depth="0"' in html and 'data-depth="1"' in html  # indented from the scope's tenant


def test_search_and_filters_stay_inside_the_subtree(chat_admin):
    assert listed_pks(chat_admin.get(url("tenant", "changelist"), {"q": "acme"})) == {pk(t) for t in SUBTREE}
    assert listed_pks(chat_admin.get(url("tenant", "changelist"), {"q": "other"})) == set()
    # The kind filter offers only the kinds found in the subtree (the roots' "organization" is not hinted at).
    html = chat_admin.get(url("tenant", "changelist")).content.decode()
    assert "organization" not in html


@pytest.mark.parametrize("tenant_id", sorted(OUTSIDE))
def test_other_tenants_pages_answer_as_missing(chat_admin, tenant_id):
    target = pk(tenant_id)
    for view in ("change", "delete", "history"):
        assert_hidden(chat_admin.get(url("tenant", view, target)), tenant_id)
    # A change posted to it changes nothing.
    response = chat_admin.post(url("tenant", "change", target), {"name": "hijacked", "kind": "x"})
    assert response.status_code == 302
    assert Tenant.objects.get(pk=target).name != "hijacked"


def test_own_tenant_is_view_only_and_shows_its_subtree_usage(chat_admin):
    own = pk("acme-chat")
    response = chat_admin.get(url("tenant", "change", own))
    assert response.status_code == 200
    html = response.content.decode()
    assert 'name="_save"' not in html  # no save button: view only
    assert "acme-search" not in html and url("tenant", "change", pk("acme")) not in html  # lineage starts here
    assert chat_admin.post(url("tenant", "change", own), {"name": "x"}).status_code == 403
    assert chat_admin.post(url("tenant", "delete", own), {"post": "yes"}).status_code == 403
    assert Tenant.objects.filter(pk=own).exists()


def test_a_descendant_can_be_edited_but_never_made_exempt(chat_admin):
    child = Tenant.objects.get(external_id="acme-chat-key-1")
    form = {"name": "Renamed", "kind": "key", "parent": child.parent_id, "is_active": "on", "exempt": "on"}
    form.update(metadata="{}", **INLINE)
    response = chat_admin.post(url("tenant", "change", child.pk), form)
    assert response.status_code == 302, response.content.decode()[:2000]
    child.refresh_from_db()
    assert child.name == "Renamed"
    assert child.exempt is False  # exempt lifts every limit above it: read-only inside a scope


def test_a_new_tenant_must_go_inside_the_subtree(chat_admin):
    base = {"external_id": "new-key", "kind": "key", "is_active": "on", "metadata": "{}", **INLINE}
    # No parent (a root) or a parent outside: refused.
    response = chat_admin.post(url("tenant", "add"), base)
    assert response.status_code == 200 and "This field is required" in response.content.decode()
    response = chat_admin.post(url("tenant", "add"), {**base, "parent": pk("acme-search")})
    assert response.status_code == 200 and "Select a valid choice" in response.content.decode()
    assert not Tenant.objects.filter(external_id="new-key").exists()
    response = chat_admin.post(url("tenant", "add"), {**base, "parent": pk("acme-chat")})
    assert response.status_code == 302
    assert Tenant.objects.get(external_id="new-key").parent_id == pk("acme-chat")


def test_a_descendant_cannot_be_moved_out_of_the_subtree(chat_admin):
    child = Tenant.objects.get(external_id="acme-chat-key-2")
    form = {"name": "", "kind": "", "parent": pk("other"), "is_active": "on", "metadata": "{}", **INLINE}
    response = chat_admin.post(url("tenant", "change", child.pk), form)
    assert response.status_code == 200 and "Select a valid choice" in response.content.decode()
    child.refresh_from_db()
    assert child.parent_id == pk("acme-chat")


def test_autocomplete_offers_only_the_subtree_and_for_quotas_only_below_it(chat_admin):
    def offered(model_name: str, app_label: str, field_name: str) -> set[str]:
        response = chat_admin.get(
            reverse("admin:autocomplete"),
            {"app_label": app_label, "model_name": model_name, "field_name": field_name, "term": ""},
        )
        assert response.status_code == 200
        return {row["text"] for row in response.json()["results"]}

    assert offered("tenant", "xaas_tenants", "parent") == SUBTREE
    assert offered("quotalimit", "xaas_quotas", "tenant") == SUBTREE - {"acme-chat"}
    assert offered("apikey", "xaas_tenants", "tenant") == SUBTREE


# ---- quotas: never on the own tenant or an ancestor ----


def quota_form(tenant_id: str, amount: str = "500", **extra: str) -> dict[str, object]:
    return {
        "tenant": pk(tenant_id),
        "feature": "llm_tokens",
        "limit": amount,
        "period": "month",
        "enforcement": "hard",
        "warning_thresholds": "[80, 100]",
        "is_active": "on",
        **extra,
    }


def test_a_quota_on_the_own_tenant_is_refused_with_a_clear_error(chat_admin):
    response = chat_admin.post(url("quotalimit", "add"), quota_form("acme-chat", "999999"))
    assert response.status_code == 200
    html = response.content.decode()
    assert "limits can be set only on its descendants" in html
    assert not QuotaLimit.objects.exists()


@pytest.mark.parametrize("tenant_id", ["acme", "acme-search", "other"])
def test_a_quota_outside_the_subtree_is_refused(chat_admin, tenant_id):
    response = chat_admin.post(url("quotalimit", "add"), quota_form(tenant_id, "999999"))
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    assert not QuotaLimit.objects.exists()


def test_a_quota_on_a_descendant_is_accepted(chat_admin):
    response = chat_admin.post(url("quotalimit", "add"), quota_form("acme-chat-key-1", "500"))
    assert response.status_code == 302
    quota = QuotaLimit.objects.get()
    assert (quota.tenant.external_id, quota.limit) == ("acme-chat-key-1", Decimal(500))


def test_own_and_ancestor_quotas_cannot_be_raised_lowered_or_deleted(chat_admin):
    own = limit("acme-chat", 1000)
    ancestor = limit("acme", 5000)
    child = limit("acme-chat-key-1", 100)
    # Ancestor: invisible.
    assert_hidden(chat_admin.get(url("quotalimit", "change", ancestor.pk)), "5000")
    assert listed_pks(chat_admin.get(url("quotalimit", "changelist"))) == {own.pk, child.pk}
    # Own: visible, view only.
    response = chat_admin.get(url("quotalimit", "change", own.pk))
    assert response.status_code == 200 and 'name="_save"' not in response.content.decode()
    for amount in ("1000000", "1"):
        assert chat_admin.post(url("quotalimit", "change", own.pk), quota_form("acme-chat", amount)).status_code == 403
    assert chat_admin.post(url("quotalimit", "delete", own.pk), {"post": "yes"}).status_code == 403
    # Moving a descendant's quota onto the own tenant is refused too.
    response = chat_admin.post(url("quotalimit", "change", child.pk), quota_form("acme-chat", "100000"))
    assert response.status_code == 200 and "limits can be set only on its descendants" in response.content.decode()
    own.refresh_from_db()
    child.refresh_from_db()
    assert (own.limit, own.tenant_id, child.tenant_id) == (Decimal(1000), pk("acme-chat"), pk("acme-chat-key-1"))
    # A descendant's quota: changed, then deleted.
    assert (
        chat_admin.post(url("quotalimit", "change", child.pk), quota_form("acme-chat-key-1", "250")).status_code == 302
    )
    child.refresh_from_db()
    assert child.limit == Decimal(250)
    assert chat_admin.post(url("quotalimit", "delete", child.pk), {"post": "yes"}).status_code == 302
    assert not QuotaLimit.objects.filter(pk=child.pk).exists()


def test_list_editing_leaves_the_own_tenants_quota_alone(chat_admin):
    own = limit("acme-chat", 1000)
    child = limit("acme-chat-key-1", 100)
    page = chat_admin.get(url("quotalimit", "changelist")).content.decode()
    prefix = {int(value): name for name, value in re.findall(r'name="(form-\d+)-id" value="(\d+)"', page)}
    # The own tenant's limit is text (no input that looks editable); the descendant's is an input.
    assert re.search(rf'<span class="xaas-readonly" data-field="{prefix[own.pk]}-limit"[^>]*>1000</span>', page)
    assert f'name="{prefix[own.pk]}-limit"' not in page
    assert re.search(rf'<input[^>]*name="{prefix[child.pk]}-limit"', page)
    assert not re.search(rf'name="{prefix[child.pk]}-limit"[^>]*disabled', page)
    data = {"form-TOTAL_FORMS": "2", "form-INITIAL_FORMS": "2", "form-MIN_NUM_FORMS": "0", "_save": "Save"}
    for quota, amount in ((own, "999999"), (child, "200")):
        name = prefix[quota.pk]
        data.update({f"{name}-id": str(quota.pk), f"{name}-limit": amount, f"{name}-enforcement": "hard"})
        data[f"{name}-is_active"] = "on"
    response = chat_admin.post(url("quotalimit", "changelist"), data)
    assert response.status_code == 302, response.content.decode()[:3000]
    own.refresh_from_db()
    child.refresh_from_db()
    assert (own.limit, child.limit) == (Decimal(1000), Decimal(200))


def test_actions_skip_the_own_tenants_quotas(chat_admin):
    own = limit("acme-chat", 1000)
    child = limit("acme-chat-key-1", 100)
    response = chat_admin.post(
        url("quotalimit", "changelist"),
        {"action": "deactivate", "index": "0", "_selected_action": [own.pk, child.pk]},
        follow=True,
    )
    html = response.content.decode()
    assert "1 quota(s) updated." in html and "left unchanged" in html
    own.refresh_from_db()
    child.refresh_from_db()
    assert own.is_active and not child.is_active
    # Bulk delete refuses as a whole when the own tenant's quota is selected.
    response = chat_admin.post(
        url("quotalimit", "changelist"),
        {"action": "delete_selected", "index": "0", "_selected_action": [own.pk], "post": "yes"},
    )
    assert response.status_code == 403
    assert QuotaLimit.objects.filter(pk=own.pk).exists()


def test_the_tenant_page_inline_is_view_only_on_the_own_tenant(chat_admin):
    limit("acme-chat", 1000)
    limit("acme-chat-key-1", 100)
    own_page = chat_admin.get(url("tenant", "change", pk("acme-chat"))).content.decode()
    assert 'name="quota_limits-0-limit"' not in own_page and "xaas-usage" in own_page
    child_page = chat_admin.get(url("tenant", "change", pk("acme-chat-key-1"))).content.decode()
    assert 'name="quota_limits-0-limit"' in child_page


# ---- facts, rollups, reservations, outbox, API keys, and what stays hidden ----


def test_facts_rollups_and_outbox_are_narrowed_to_the_subtree(chat_admin):
    inside = set(UsageRecord.objects.filter(tenant__path__startswith=Tenant.objects.get(external_id="acme-chat").path))
    assert linked_pks(chat_admin.get(url("usagerecord", "changelist")), "usagerecord") == {fact.pk for fact in inside}
    outside_fact = UsageRecord.objects.get(tenant__external_id="other-project")
    assert_hidden(chat_admin.get(url("usagerecord", "change", outside_fact.pk)))
    rollups = linked_pks(chat_admin.get(url("usagerollup", "changelist")), "usagerollup")
    assert rollups
    assert rollups == set(
        UsageRollup.objects.filter(tenant_id__in=[pk(t) for t in SUBTREE]).values_list("pk", flat=True)
    )
    ancestor_rollup = UsageRollup.objects.filter(tenant__external_id="acme").first()
    assert_hidden(chat_admin.get(url("usagerollup", "change", ancestor_rollup.pk)))
    now = utcnow()
    for fact in UsageRecord.objects.all():
        UsageOutbox.objects.get_or_create(record=fact, defaults={"sink": "lago", "next_attempt_at": now})
    page = chat_admin.get(url("usageoutbox", "changelist"))
    assert listed_pks(page) == set(UsageOutbox.objects.filter(record__in=inside).values_list("pk", flat=True))
    assert "pending (2)" in page.content.decode()  # the state filter counts the subtree only


def test_reservations_are_narrowed_to_the_subtree(chat_admin):
    now = utcnow()
    made = {
        tenant_id: QuotaReservation.objects.create(
            tenant=Tenant.objects.get(external_id=tenant_id),
            feature="llm_tokens",
            units=10**6,
            window_at=now,
            expires_at=now + timedelta(minutes=5),
        )
        for tenant_id in ("acme-chat", "acme-chat-key-1", "acme", "other-project")
    }
    page = chat_admin.get(url("quotareservation", "changelist"))
    assert listed_pks(page) == {made["acme-chat"].pk, made["acme-chat-key-1"].pk}
    assert_hidden(chat_admin.get(url("quotareservation", "change", made["other-project"].pk)))


def test_api_keys_are_narrowed_to_the_subtree(chat_admin):
    mine, _ = create_api_key("acme-chat-key-1")
    theirs, _ = create_api_key("other")
    assert listed_pks(chat_admin.get(url("apikey", "changelist"))) == {mine.pk}
    assert_hidden(chat_admin.get(url("apikey", "change", theirs.pk)))


def test_delivery_sinks_and_scopes_are_hidden_from_scoped_staff(chat_admin):
    index = chat_admin.get(reverse("admin:index")).content.decode()
    assert "Delivery sinks" not in index and "Tenant administrators" not in index
    assert "Quota limits" in index and "Tenants" in index
    assert chat_admin.get(url("sinkstate", "changelist")).status_code == 403
    assert chat_admin.get(url("tenantadminscope", "changelist")).status_code == 403


def test_a_superuser_sees_everything(forest):
    client = login(superuser())
    assert listed_pks(client.get(url("tenant", "changelist"))) == set(Tenant.objects.values_list("pk", flat=True))
    quota = limit("acme", 10)
    assert client.get(url("quotalimit", "change", quota.pk)).status_code == 200
    assert client.post(url("quotalimit", "add"), quota_form("acme-chat", "7")).status_code == 302


def test_staff_without_a_scope_are_bound_by_model_permissions_only(forest):
    client = login(staff_user("operator"))
    assert listed_pks(client.get(url("tenant", "changelist"))) == set(Tenant.objects.values_list("pk", flat=True))
    assert client.get(url("sinkstate", "changelist")).status_code == 200


def test_scopes_are_managed_by_superusers_and_never_bind_a_superuser(forest):
    root = superuser()
    target = staff_user("new-admin")
    client = login(root)
    page = client.get(url("tenantadminscope", "add")).content.decode()
    offered = re.findall(r'<option value="(\d+)"', page.split('name="user"')[1].split("</select>")[0])
    assert offered == [str(target.pk)]  # staff only, and never a superuser: superusers are never narrowed
    response = client.post(url("tenantadminscope", "add"), {"user": target.pk, "tenant": pk("acme-search")})
    assert response.status_code == 302
    assert TenantAdminScope.objects.get(user=target).tenant.external_id == "acme-search"
    assert listed_pks(login(target).get(url("tenant", "changelist"))) == {pk("acme-search"), pk("acme-search-key-1")}


def test_a_scoped_tenant_cannot_be_deleted_from_under_its_administrators(forest):
    from django.db.models import ProtectedError

    leaf = create_tenant("fresh-leaf", parent="acme-search")
    staff_user("leaf-admin", "fresh-leaf")
    with pytest.raises(ProtectedError):
        leaf.delete()  # else its administrator would silently become unscoped staff


# ---- rendering: the tree, the usage bars and the charts ----


def bars(html: str) -> list[dict[str, str]]:
    return [
        dict(re.findall(r'data-(level|used|limit|percent)="([^"]*)"', match))
        for match in re.findall(r'<span class="xaas-usage [^>]*>', html)
    ]


def test_the_tree_shows_indentation_lineage_and_usage_bars(forest):
    limit("acme", 1000)  # 30 used: ok
    limit("acme-chat", 25)  # 20 used: 80 % -> warn
    limit("acme-chat-key-1", 5, period="day")  # 10 used: over
    limit("acme-search", 10, is_active=False)  # inactive quotas are left out of the tree
    html = login(superuser()).get(url("tenant", "changelist")).content.decode()
    depths = {name: int(depth) for depth, name in re.findall(r'data-depth="(\d)"[^>]*>(?:└ )?([\w-]+)<', html)}
    assert depths == {
        "acme": 0,
        "acme-chat": 1,
        "acme-chat-key-1": 2,
        "acme-chat-key-2": 2,
        "acme-search": 1,
        "acme-search-key-1": 2,
        "other": 0,
        "other-project": 1,
    }
    order = re.findall(r'data-depth="\d"[^>]*>(?:└ )?([\w-]+)<', html)
    assert order.index("acme") < order.index("acme-chat") < order.index("acme-chat-key-1") < order.index("other")
    assert bars(html) == [
        {"level": "ok", "used": "30", "limit": "1000", "percent": "3.0"},
        {"level": "warn", "used": "20", "limit": "25", "percent": "80.0"},
        {"level": "over", "used": "10", "limit": "5", "percent": "200.0"},
    ]
    assert "background:#e09400" in html and "background:#c62828" in html and "background:#2e7d32" in html
    assert "llm_tokens: 10 this month" in html  # a tenant without a quota shows its month's usage
    key_row = html[html.index(f'value="{pk("acme-chat-key-1")}"') :].split("</tr>")[0]
    assert re.search(
        r'<span class="xaas-lineage"[^>]*><a href="[^"]+">acme</a> &rsaquo; <a href="[^"]+">acme-chat</a>', key_row
    )


def test_the_tree_page_costs_a_constant_number_of_queries():
    client = login(superuser())

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert client.get(url("tenant", "changelist")).status_code == 200
        return len(captured)

    def grow(first: int, last: int) -> None:
        for index in range(first, last):
            parent = f"t-{index - 1}" if index % 4 else None  # chains of four: roots, children, grandchildren
            create_tenant(f"t-{index}", parent=parent, kind="project" if parent else "organization")
            limit(f"t-{index}", 100, period=["hour", "day", "month", "total"][index % 4])
            record(f"t-{index}", 1, feature=f"feature_{index % 3}")

    grow(0, 4)
    few = queries()
    grow(4, 60)
    assert queries() == few


def test_the_tenant_page_draws_usage_bars_and_a_30_day_chart_per_feature(forest):
    record_days_ago("acme-chat-key-1", 30, days=3)
    record_days_ago("acme-chat-key-2", 12, days=3)
    record_days_ago("acme-chat-key-1", "7.5", days=29)
    record_days_ago("acme-chat-key-1", 1000, days=30)  # 31 days ago counting today: outside the chart
    record_days_ago("acme-chat-key-1", 4, days=1, feature="api_calls")
    limit("acme-chat", 50, period="day")  # today: 20 used (the fixture's facts) -> ok, 40 %
    limit("acme-chat", 100, feature="api_calls", period="total", warning_thresholds=[1])  # 4 used -> warn
    response = login(superuser()).get(url("tenant", "change", pk("acme-chat")))
    html = response.content.decode()
    assert bars(html) == [
        {"level": "warn", "used": "4", "limit": "100", "percent": "4.0"},
        {"level": "ok", "used": "20", "limit": "50", "percent": "40.0"},
    ]
    assert 'role="meter" aria-valuemin="0" aria-valuemax="50" aria-valuenow="20"' in html
    # Breadcrumbs: Home > Tenants > Tenants > acme > acme-chat
    assert re.search(
        rf'&rsaquo; <a href="{url("tenant", "change", pk("acme"))}">acme</a>\s*'
        r'&rsaquo; <span aria-current="page">acme-chat</span>',
        html,
    )
    charts = dict(re.findall(r'<figure class="xaas-usage-chart" data-feature="([^"]+)" data-total="([^"]+)"', html))
    assert charts == {"api_calls": "4", "llm_tokens": "69.5"}  # 20 today + 42 three days ago + 7.5
    llm = html[html.index('data-feature="llm_tokens"') :].split("</figure>")[0]
    days = dict(re.findall(r'<rect class="bar"[^>]*data-day="([\d-]+)" data-quantity="([^"]+)"', llm))
    today = utcnow().date()
    assert len(days) == 30 and min(days) == str(today - timedelta(days=29)) and max(days) == str(today)
    assert days[str(today)] == "20" and days[str(today - timedelta(days=3))] == "42"
    assert days[str(today - timedelta(days=29))] == "7.5"
    assert sum(Decimal(value) for value in days.values()) == Decimal("69.5")
    assert re.search(r'<svg [^>]*role="img"[^>]*aria-labelledby="xaas-chart-\d+-llm_tokens-title', llm)
    assert "<title id=" in llm and "llm_tokens per day, last 30 days" in llm
    assert "daily limit 50" in llm and "stroke-dasharray" in llm  # the daily quota drawn as a line
    assert "daily limit" not in html[html.index('data-feature="api_calls"') :].split("</figure>")[0]
    # The tallest bar (42, three days ago) has the full height of its axis (50: the limit is higher).
    heights = {day: height for height, day in re.findall(r'height="([\d.]+)" data-day="([\d-]+)"', llm)}
    assert float(heights[str(today - timedelta(days=3))]) == pytest.approx(146 * 42 / 50, abs=0.01)
    # Nothing is loaded from elsewhere: no CDN, no remote script or stylesheet.
    assert not re.search(r'(src|href)="(https?:)?//', html)
