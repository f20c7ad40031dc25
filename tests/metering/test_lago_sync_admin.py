"""The admin's "Sync to Lago" action: a preview for the plan code typed in, then the same sync as ``lago_sync``;
superusers only, and only with the Lago sink configured."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth.models import Permission, User
from django.test import Client

from tenants.models import Tenant, TenantAdminScope

pytest_plugins = ["tests.lago_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)
URL = "/admin/xaas_tenants/tenant/"


def _superuser() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", "x" * 16))
    return client


def _post(client: Client, tenants: list[Tenant], **fields: str) -> Any:
    data = {"action": "sync_to_lago", ACTION_CHECKBOX_NAME: [str(t.pk) for t in tenants], **fields}
    return client.post(URL, data)


def test_preview_then_apply(lago_settings: Any, org: dict[str, Tenant]):
    client = _superuser()
    first = _post(client, [org["org"]])
    assert first.status_code == 200 and b"Plan code for new subscriptions" in first.content
    preview = _post(client, [org["org"]], lago_plan_code="starter")
    page = preview.content.decode()
    assert "would create customer org" in page and "would create subscription sub-org of org on plan starter" in page
    assert lago_settings.customers == {} and lago_settings.subscriptions == {}  # a preview changes nothing
    applied = _post(client, [org["org"]], lago_plan_code="starter", lago_apply="1")
    assert applied.status_code == 302
    assert set(lago_settings.customers) == {"org"}
    assert lago_settings.subscriptions["sub-org"]["plan_code"] == "starter"
    again = _post(client, [org["org"]], lago_plan_code="starter")
    assert "Nothing: Lago already holds all of it." in again.content.decode()  # idempotent


def test_only_superusers_and_only_with_lago(lago_settings: Any, org: dict[str, Tenant], settings: Any):
    staff = User.objects.create_user("ops", password="x" * 16, is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(content_type__app_label="xaas_tenants"))
    TenantAdminScope.objects.create(user=staff, tenant=org["org"])
    client = Client()
    client.force_login(staff)
    assert b"sync_to_lago" not in client.get(URL).content
    _post(client, [org["org"]], lago_plan_code="starter", lago_apply="1")
    assert lago_settings.customers == {}
    root = _superuser()
    assert b"sync_to_lago" in root.get(URL).content
    settings.METERING = {}  # the database adapter: nothing to sync to
    assert b"sync_to_lago" not in root.get(URL).content
