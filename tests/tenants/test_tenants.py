from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from tenants.exceptions import InactiveTenant, InvalidTenantId, TreeError, UnknownTenant
from tenants.lineage import get_context
from tenants.models import Tenant
from tenants.tree import create_tenant, move_tenant
from tests.factories import tree
from tests.identity_helpers import TRUSTED_HEADER

pytestmark = pytest.mark.django_db

ORG = {"org": None, "p1": "org", "p2": "org", "k1": "p1", "k2": "p1", "k3": "p2"}


def test_lineage_is_root_first_and_paths_follow_moves(django_capture_on_commit_callbacks):
    tree(ORG)
    assert get_context("k1").lineage_ids == ("org", "p1", "k1")
    with django_capture_on_commit_callbacks(execute=True):
        move_tenant("p1", "p2")
    assert get_context("k1").lineage_ids == ("org", "p2", "p1", "k1")
    assert get_context("k2").lineage_ids == ("org", "p2", "p1", "k2")
    pks = {tenant.external_id: tenant.pk for tenant in Tenant.objects.all()}
    for tenant in Tenant.objects.all():
        lineage = get_context(tenant.external_id).lineage_ids
        assert tenant.path == "/" + "".join(f"{pks[tenant_id]}/" for tenant_id in lineage)
        assert tenant.depth == len(lineage) - 1
    with django_capture_on_commit_callbacks(execute=True):
        move_tenant("p1", None)
    assert get_context("k1").lineage_ids == ("p1", "k1")
    assert Tenant.objects.get(external_id="k1").depth == 1


def test_cycles_and_self_parenting_are_refused_and_change_nothing():
    tenants = tree(ORG)
    with pytest.raises(TreeError):
        move_tenant("p1", "k1")
    with pytest.raises(TreeError):
        move_tenant("p1", "p1")
    with pytest.raises(TreeError):
        move_tenant("org", "k3")
    assert get_context("k1").lineage_ids == ("org", "p1", "k1")
    assert Tenant.objects.get(pk=tenants["p1"].pk).path == tenants["p1"].path


def test_admin_style_edit_is_validated_by_full_clean():
    tenants = tree(ORG)
    p1 = Tenant.objects.get(pk=tenants["p1"].pk)
    p1.parent = Tenant.objects.get(external_id="k1")
    with pytest.raises(ValidationError) as error:
        p1.full_clean()
    assert "parent" in error.value.message_dict


def test_saving_a_stale_instance_never_writes_an_old_path():
    tree(ORG)
    stale = Tenant.objects.get(external_id="k1")
    move_tenant("p1", "p2")
    assert stale.path != Tenant.objects.get(external_id="k1").path
    stale.name = "renamed"
    stale.save()
    assert get_context("k1", use_cache=False).lineage_ids == ("org", "p2", "p1", "k1")
    assert Tenant.objects.get(external_id="k1").name == "renamed"


def test_tenant_id_is_validated_and_stable():
    with pytest.raises(ValidationError):
        create_tenant("has space")
    with pytest.raises(ValidationError):
        create_tenant("")
    tenant = create_tenant("ok-1")
    tenant.external_id = "ok-2"
    with pytest.raises(ValidationError):
        tenant.full_clean()


def test_depth_limit(settings):
    settings.METERING = {"MAX_TREE_DEPTH": 3}
    tree({"a": None, "b": "a", "c": "b"})
    with pytest.raises(TreeError):
        create_tenant("d", parent="c")


def test_lineage_costs_one_query_and_none_when_cached(redis_cache):
    tree(ORG)
    with CaptureQueriesContext(connection) as queries:
        get_context("k3")
    assert len(queries) == 1
    with CaptureQueriesContext(connection) as queries:
        assert get_context("k3").lineage_ids == ("org", "p2", "k3")
    assert len(queries) == 0


def test_lineage_is_never_cached_in_a_per_process_cache(settings):
    """LocMem (the default) and Dummy caches are not seen by other processes: an invalidation could not reach them."""
    tree(ORG)
    for backend in ("django.core.cache.backends.locmem.LocMemCache", "django.core.cache.backends.dummy.DummyCache"):
        settings.CACHES = {"default": {"BACKEND": backend}}
        for _ in range(2):
            with CaptureQueriesContext(connection) as queries:
                assert get_context("k3").lineage_ids == ("org", "p2", "k3")
            assert len(queries) == 1


def test_lineage_cache_is_invalidated_on_commit_of_a_change(redis_cache, django_capture_on_commit_callbacks):
    tree(ORG)
    assert not get_context("k1").exempt
    with django_capture_on_commit_callbacks(execute=True):
        org = Tenant.objects.get(external_id="org")
        org.exempt = True
        org.save()
    assert get_context("k1").exempt  # inherited from the organization: the whole subtree is zero-cap
    with django_capture_on_commit_callbacks(execute=True):
        move_tenant("k1", "p2")
    assert get_context("k1").lineage_ids == ("org", "p2", "k1")
    with django_capture_on_commit_callbacks(execute=True):
        p2 = Tenant.objects.get(external_id="p2")
        p2.is_active = False
        p2.save()
    with pytest.raises(InactiveTenant):
        get_context("k1")
    assert get_context("k1", require_active=False).tenant_id == "k1"


def test_a_reader_that_loaded_before_a_change_cannot_cache_the_old_lineage(redis_cache):
    """The race of a shared cache: process A reads the lineage from the database, process B commits a change and
    invalidates, then A caches what it read. The invalidation's tombstone makes A's late write a no-op."""
    from tenants import lineage

    tree(ORG)
    stale_rows = lineage._load_lineage("k1")  # A's read, before the change
    Tenant.objects.filter(external_id="org").update(exempt=True)  # B's change...
    lineage.invalidate(["k1"])  # ...and its on-commit invalidation
    lineage._cache_call("add", lineage._cache_key("k1"), stale_rows, 300)  # A caches late
    assert get_context("k1").exempt
    with CaptureQueriesContext(connection) as queries:
        assert get_context("k1").exempt
    assert len(queries) == 1  # while the tombstone lives, reads go to the database


def test_unknown_and_invalid_ids():
    with pytest.raises(UnknownTenant):
        get_context("nobody")
    with pytest.raises(InvalidTenantId):
        get_context("")
    with pytest.raises(InvalidTenantId):
        get_context(42)  # type: ignore[arg-type]


def test_deleting_a_parent_with_children_is_refused():
    from django.db.models import ProtectedError

    tree(ORG)
    with pytest.raises(ProtectedError):
        Tenant.objects.get(external_id="p1").delete()


@pytest.mark.parametrize("async_view", [False, True])
def test_middleware_resolves_tenant_for_sync_and_async_views(async_view, settings):
    settings.ROOT_URLCONF = "tests.urls"
    settings.METERING = TRUSTED_HEADER
    tree(ORG)
    client = Client()
    url = "/whoami-async" if async_view else "/whoami"
    assert client.get(url).json() == {"tenant": None}
    response = client.get(url, headers={"X-Tenant-ID": "k1"})
    assert response.json() == {"tenant": "k1", "lineage": ["org", "p1", "k1"], "exempt": False}
    unknown = client.get(url, headers={"X-Tenant-ID": "ghost"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_tenant"
    assert unknown.json()["error"]["field"] == "X-Tenant-ID"
    Tenant.objects.filter(external_id="p1").update(is_active=False)
    from tenants.lineage import invalidate

    invalidate(["k1"])
    assert client.get(url, headers={"X-Tenant-ID": "k1"}).status_code == 403


def test_resolver_setting_is_read_at_use_time(settings):
    settings.ROOT_URLCONF = "tests.urls"
    settings.METERING = {"TENANT_RESOLVER": "tests.urls.query_resolver"}
    tree(ORG)
    assert Client().get("/whoami?tenant=k2").json()["tenant"] == "k2"
