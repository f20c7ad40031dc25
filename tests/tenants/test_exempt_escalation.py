"""Exemption cannot be acquired from below (issue 10, item 2).

A scoped administrator may not make a tenant exempt or end an exemption, move a tenant into or out of an exempt
subtree (nor move a subtree holding one), add a tenant inside one, or issue a key for one — through the change form,
the add form, list editing, actions, inlines or the key form, including crafted POSTs of fields the form does not
show. Each refusal is a form error naming the field, or a 403, and writes nothing. Unscoped administrators
(superusers, staff without a scope) and the operator commands still can.
"""

from __future__ import annotations

import re
from io import StringIO
from typing import Any

import pytest
from django.contrib import admin
from django.core.management import call_command
from django.test import Client

from quotas.models import QuotaLimit
from tenants.admin_scope import EXEMPTION_REFUSAL
from tenants.models import ApiKey, Tenant
from tenants.tree import create_tenant
from tests.admin_fixtures import build_forest, staff_user, superuser
from tests.quotas.test_admin_scope import INLINE, login, pk, url

pytestmark = pytest.mark.django_db

EXEMPT = "acme-chat-key-1"  # made exempt by an unscoped administrator; inside chat-admin's subtree
BELOW_EXEMPT = "acme-chat-key-1-a"


@pytest.fixture
def forest():
    tenants = build_forest()
    Tenant.objects.filter(external_id=EXEMPT).update(exempt=True)
    create_tenant(BELOW_EXEMPT, parent=EXEMPT)
    return tenants


@pytest.fixture
def chat_admin(forest) -> Client:
    return login(staff_user("chat-admin", "acme-chat"))


@pytest.fixture(params=["superuser", "unscoped-staff"])
def unscoped(request, forest) -> Client:
    return login(superuser() if request.param == "superuser" else staff_user("operator"))


def tenant(tenant_id: str) -> Tenant:
    return Tenant.objects.get(external_id=tenant_id)


def change_form(tenant_id: str, **fields: object) -> dict[str, object]:
    row = tenant(tenant_id)
    form: dict[str, object] = {
        "name": row.name,
        "kind": row.kind,
        "parent": row.parent_id or "",
        "is_active": "on",
        "metadata": "{}",
        **INLINE,
    }
    if row.exempt:
        form["exempt"] = "on"
    form.update(fields)
    return {key: value for key, value in form.items() if value is not None}


def add_form(tenant_id: str, parent: str, **fields: object) -> dict[str, object]:
    return {"external_id": tenant_id, "kind": "key", "parent": pk(parent), "is_active": "on", "metadata": "{}"} | {
        **INLINE,
        **fields,
    }


def shape() -> dict[str, tuple[int | None, bool, str]]:
    return {row.external_id: (row.parent_id, row.exempt, row.path) for row in Tenant.objects.all()}


# ---- the change form ----


def test_a_scoped_admin_cannot_make_a_tenant_exempt_even_by_posting_the_read_only_field(chat_admin):
    before = shape()
    response = chat_admin.post(
        url("tenant", "change", pk("acme-chat-key-2")), change_form("acme-chat-key-2", exempt="on")
    )
    assert response.status_code == 302  # the field is read-only: the posted value is ignored, not applied
    assert shape() == before and not tenant("acme-chat-key-2").exempt


def test_a_scoped_admin_cannot_end_an_exemption(chat_admin):
    form = change_form(EXEMPT, name="renamed")
    del form["exempt"]  # an unchecked box
    assert chat_admin.post(url("tenant", "change", pk(EXEMPT)), form).status_code == 302
    row = tenant(EXEMPT)
    assert row.exempt and row.name == "renamed"  # other fields of an exempt tenant stay editable


def test_a_scoped_admin_cannot_move_a_tenant_under_an_exempt_one(chat_admin):
    before = shape()
    form = change_form("acme-chat-key-2", parent=pk(EXEMPT))
    response = chat_admin.post(url("tenant", "change", pk("acme-chat-key-2")), form)
    assert response.status_code == 200
    html = response.content.decode()
    assert EXEMPTION_REFUSAL["move"] in html
    assert re.search(r'<ul class="errorlist"[^>]*id="id_parent_error"', html)  # on the parent field
    assert shape() == before


@pytest.mark.parametrize("moved", [EXEMPT, BELOW_EXEMPT])
def test_a_scoped_admin_cannot_move_a_tenant_out_of_an_exempt_subtree(chat_admin, moved):
    before = shape()
    response = chat_admin.post(url("tenant", "change", pk(moved)), change_form(moved, parent=pk("acme-chat-key-2")))
    assert response.status_code == 200
    assert EXEMPTION_REFUSAL["move"] in response.content.decode()
    assert shape() == before


def test_a_scoped_admin_cannot_move_a_subtree_that_holds_an_exempt_tenant(chat_admin):
    create_tenant("holder", parent="acme-chat")
    create_tenant("held", parent="holder", exempt=True)
    before = shape()
    response = chat_admin.post(
        url("tenant", "change", pk("holder")), change_form("holder", parent=pk("acme-chat-key-2"))
    )
    assert response.status_code == 200 and EXEMPTION_REFUSAL["move"] in response.content.decode()
    assert shape() == before


def test_a_refused_move_writes_nothing_of_the_inlines_either(chat_admin):
    form = change_form("acme-chat-key-2", parent=pk(EXEMPT))
    form.update(
        {
            "quota_limits-TOTAL_FORMS": "1",
            "quota_limits-0-feature": "llm_tokens",
            "quota_limits-0-period": "month",
            "quota_limits-0-limit": "5",
            "quota_limits-0-enforcement": "hard",
            "quota_limits-0-warning_thresholds": "[80, 100]",
            "quota_limits-0-is_active": "on",
        }
    )
    assert chat_admin.post(url("tenant", "change", pk("acme-chat-key-2")), form).status_code == 200
    assert not QuotaLimit.objects.exists()
    assert tenant("acme-chat-key-2").parent_id == pk("acme-chat")


def test_moves_that_touch_no_exempt_level_still_work_for_a_scoped_admin(chat_admin):
    create_tenant("mover", parent="acme-chat")
    response = chat_admin.post(url("tenant", "change", pk("mover")), change_form("mover", parent=pk("acme-chat-key-2")))
    assert response.status_code == 302
    assert tenant("mover").parent_id == pk("acme-chat-key-2")


# ---- the add form ----


@pytest.mark.parametrize("parent", [EXEMPT, BELOW_EXEMPT])
def test_a_scoped_admin_cannot_add_a_tenant_inside_an_exempt_subtree(chat_admin, parent):
    response = chat_admin.post(url("tenant", "add"), add_form("sneaky", parent))
    assert response.status_code == 200
    html = response.content.decode()
    assert EXEMPTION_REFUSAL["add"] in html and re.search(r'id="id_parent_error"', html)
    assert not Tenant.objects.filter(external_id="sneaky").exists()


def test_a_scoped_admin_adding_a_tenant_with_exempt_posted_gets_a_tenant_that_is_not_exempt(chat_admin):
    response = chat_admin.post(url("tenant", "add"), add_form("plain", "acme-chat", exempt="on"))
    assert response.status_code == 302
    assert tenant("plain").exempt is False


def test_a_scoped_admin_whose_own_tenant_is_under_an_exempt_level_adds_nothing(forest):
    Tenant.objects.filter(external_id="acme").update(exempt=True)
    client = login(staff_user("search-admin", "acme-search"))
    response = client.post(url("tenant", "add"), add_form("sneaky", "acme-search"))
    assert response.status_code == 200 and EXEMPTION_REFUSAL["add"] in response.content.decode()
    assert "acme<" not in response.content.decode()  # the refusal does not name the exempt level above the scope
    assert not Tenant.objects.filter(external_id="sneaky").exists()


# ---- list editing, actions ----


@pytest.fixture
def exempt_and_parent_list_editable(monkeypatch):
    """A host project that makes the tree list-editable (the shipped admin is not): the same rules apply."""
    model_admin = admin.site._registry[Tenant]
    monkeypatch.setattr(model_admin, "list_editable", ("parent", "exempt"))
    monkeypatch.setattr(model_admin, "list_display", (*model_admin.list_display, "parent"))
    return model_admin


def changelist_post(client: Client, rows: dict[str, Any]) -> Any:
    data: dict[str, object] = {
        "form-TOTAL_FORMS": str(len(rows)),
        "form-INITIAL_FORMS": str(len(rows)),
        "form-MIN_NUM_FORMS": "0",
        "_save": "Save",
    }
    for index, (tenant_id, fields) in enumerate(rows.items()):
        data[f"form-{index}-id"] = pk(tenant_id)
        data.update({f"form-{index}-{name}": value for name, value in fields.items()})
    return client.post(url("tenant", "changelist"), data)


def test_list_editing_without_list_editable_changes_nothing(chat_admin):
    before = shape()
    response = changelist_post(chat_admin, {"acme-chat-key-2": {"exempt": "on", "parent": pk(EXEMPT)}})
    assert response.status_code in (200, 302)
    assert shape() == before


def test_list_editing_refuses_exemption_and_moves_for_a_scoped_admin(chat_admin, exempt_and_parent_list_editable):
    before = shape()
    rows: dict[str, Any]
    for rows in (
        {"acme-chat-key-2": {"exempt": "on", "parent": pk("acme-chat")}},
        {"acme-chat-key-2": {"parent": pk(EXEMPT)}},
        {EXEMPT: {"parent": pk("acme-chat-key-2")}},  # and unchecking its exempt box
        {"acme-chat-key-2": {"parent": pk("acme-chat")}, BELOW_EXEMPT: {"parent": pk("acme-chat"), "exempt": "on"}},
    ):
        response = changelist_post(chat_admin, rows)
        assert response.status_code == 200, rows  # the list again, with the errors
        assert "Only an administrator without a tenant scope" in response.content.decode()
        assert shape() == before, rows


def test_list_editing_by_an_unscoped_admin_still_works(unscoped, exempt_and_parent_list_editable):
    response = changelist_post(unscoped, {"acme-chat-key-2": {"exempt": "on", "parent": pk(EXEMPT)}})
    assert response.status_code == 302, response.content.decode()[:3000]
    row = tenant("acme-chat-key-2")
    assert row.exempt and row.parent_id == pk(EXEMPT)


@pytest.mark.parametrize("action", ["make_exempt", "end_exemption"])
def test_the_exemption_actions_are_neither_offered_to_nor_run_for_a_scoped_admin(chat_admin, action):
    assert f'value="{action}"' not in chat_admin.get(url("tenant", "changelist")).content.decode()
    before = shape()
    response = chat_admin.post(
        url("tenant", "changelist"),
        {"action": action, "index": "0", "_selected_action": [pk("acme-chat-key-2"), pk(EXEMPT)]},
    )
    assert response.status_code in (200, 302)
    assert shape() == before


def test_the_exemption_actions_work_for_an_unscoped_admin(unscoped):
    changelist = unscoped.get(url("tenant", "changelist")).content.decode()
    assert 'value="make_exempt"' in changelist and 'value="end_exemption"' in changelist
    selected = [pk("acme-chat-key-2"), pk("other")]
    unscoped.post(url("tenant", "changelist"), {"action": "make_exempt", "index": "0", "_selected_action": selected})
    assert set(Tenant.objects.filter(exempt=True).values_list("external_id", flat=True)) == {
        EXEMPT,
        "acme-chat-key-2",
        "other",
    }
    unscoped.post(
        url("tenant", "changelist"), {"action": "end_exemption", "index": "0", "_selected_action": [pk(EXEMPT)]}
    )
    assert not tenant(EXEMPT).exempt


# ---- API keys ----


@pytest.mark.parametrize("tenant_id", [EXEMPT, BELOW_EXEMPT])
def test_a_scoped_admin_cannot_issue_a_key_inside_an_exempt_subtree(chat_admin, tenant_id):
    response = chat_admin.post(url("apikey", "add"), {"tenant": pk(tenant_id), "name": "sneaky"})
    assert response.status_code == 200
    html = response.content.decode()
    assert EXEMPTION_REFUSAL["key"] in html and re.search(r'id="id_tenant_error"', html)
    assert not ApiKey.objects.exists()


def test_a_scoped_admin_still_issues_keys_outside_exempt_subtrees(chat_admin):
    response = chat_admin.post(url("apikey", "add"), {"tenant": pk("acme-chat-key-2"), "name": "worker"})
    assert response.status_code == 200 and 'id="xaas-api-key"' in response.content.decode()
    assert ApiKey.objects.get().tenant.external_id == "acme-chat-key-2"


# ---- unscoped administrators keep every power ----


def test_an_unscoped_admin_makes_exempt_moves_and_adds_through_the_forms(unscoped):
    response = unscoped.post(
        url("tenant", "change", pk("acme-chat-key-2")), change_form("acme-chat-key-2", exempt="on")
    )
    assert response.status_code == 302 and tenant("acme-chat-key-2").exempt
    form = change_form("acme-chat-key-2", parent=pk(EXEMPT))
    assert unscoped.post(url("tenant", "change", pk("acme-chat-key-2")), form).status_code == 302
    assert tenant("acme-chat-key-2").parent_id == pk(EXEMPT)
    form = change_form(BELOW_EXEMPT, parent=pk("other"))
    assert unscoped.post(url("tenant", "change", pk(BELOW_EXEMPT)), form).status_code == 302
    assert tenant(BELOW_EXEMPT).parent_id == pk("other")
    assert unscoped.post(url("tenant", "add"), add_form("new-exempt-child", EXEMPT, exempt="on")).status_code == 302
    assert tenant("new-exempt-child").exempt and tenant("new-exempt-child").parent_id == pk(EXEMPT)
    response = unscoped.post(url("apikey", "add"), {"tenant": pk(EXEMPT), "name": "internal"})
    assert response.status_code == 200 and 'id="xaas-api-key"' in response.content.decode()
    assert ApiKey.objects.get().tenant.external_id == EXEMPT


def test_the_operator_commands_stay_unscoped(forest):
    out = StringIO()
    call_command("tenant", "add", "cmd-child", "--parent", EXEMPT, stdout=out)
    call_command("tenant", "add", "cmd-exempt", "--parent", "acme-chat", "--exempt", stdout=out)
    call_command("tenant", "move", "acme-chat-key-2", "--parent", EXEMPT, stdout=out)
    call_command("tenant", "move", BELOW_EXEMPT, "--root", stdout=out)
    call_command("apikey", "create", EXEMPT, "--name", "ops", stdout=out)
    assert tenant("cmd-child").parent_id == pk(EXEMPT)
    assert tenant("cmd-exempt").exempt
    assert tenant("acme-chat-key-2").parent_id == pk(EXEMPT)
    assert tenant(BELOW_EXEMPT).parent_id is None
    assert ApiKey.objects.get().tenant.external_id == EXEMPT


def test_the_save_path_refuses_even_when_the_forms_guard_is_gone(chat_admin, monkeypatch):
    """A host project's own form (or a bug in ours) must not open the door: save_model refuses with a 403."""
    from django import forms

    from tenants.admin import ScopedApiKeyForm, ScopedTenantForm

    monkeypatch.setattr(ScopedTenantForm, "clean", forms.ModelForm.clean)
    monkeypatch.setattr(ScopedApiKeyForm, "clean", forms.ModelForm.clean)
    before = shape()
    form = change_form("acme-chat-key-2", parent=pk(EXEMPT))
    form.update({"quota_limits-TOTAL_FORMS": "1", "quota_limits-0-feature": "x", "quota_limits-0-period": "month"})
    form.update({"quota_limits-0-limit": "5", "quota_limits-0-enforcement": "hard", "quota_limits-0-is_active": "on"})
    form["quota_limits-0-warning_thresholds"] = "[80, 100]"
    assert chat_admin.post(url("tenant", "change", pk("acme-chat-key-2")), form).status_code == 403
    assert chat_admin.post(url("tenant", "add"), add_form("sneaky", EXEMPT)).status_code == 403
    assert chat_admin.post(url("apikey", "add"), {"tenant": pk(EXEMPT)}).status_code == 403
    assert shape() == before
    assert not QuotaLimit.objects.exists() and not ApiKey.objects.exists()
