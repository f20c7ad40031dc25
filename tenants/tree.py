"""The only code that changes the shape of the tenant tree: placing a new tenant and moving a subtree.

A move keeps every descendant's path right in one UPDATE, refuses cycles, and tells listeners (the metering rollups)
inside the same transaction, while both trees are locked exclusively, so usage totals move with the subtree.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Concat, Substr

from . import lineage
from .conf import tenant_settings
from .exceptions import TreeError, UnknownTenant
from .locks import lock_trees
from .models import Tenant
from .signals import subtree_moved, subtree_moving


def get_tenant(tenant_id: str) -> Tenant:
    try:
        return Tenant.objects.get(external_id=tenant_id)
    except Tenant.DoesNotExist:
        raise UnknownTenant(f"unknown tenant {tenant_id!r}") from None


def create_tenant(
    tenant_id: str,
    *,
    parent: Tenant | str | None = None,
    name: str = "",
    kind: str = "",
    exempt: bool = False,
    is_active: bool = True,
    metadata: dict[str, Any] | None = None,
) -> Tenant:
    parent_obj = get_tenant(parent) if isinstance(parent, str) else parent
    tenant = Tenant(
        external_id=tenant_id,
        parent=parent_obj,
        name=name,
        kind=kind,
        exempt=exempt,
        is_active=is_active,
        metadata=metadata or {},
    )
    check_parent(tenant, parent_obj)  # a named TreeError rather than a ValidationError for tree violations
    tenant.full_clean(exclude=["parent"])
    tenant.save()
    return tenant


def check_parent(tenant: Tenant, parent: Tenant | None) -> None:
    """Raise ``TreeError`` if ``parent`` cannot hold ``tenant`` (self, a descendant, or too deep)."""
    if parent is None:
        return
    if tenant.pk is not None and parent.pk == tenant.pk:
        raise TreeError(f"tenant {tenant.external_id!r} cannot be its own parent")
    if tenant.pk is not None and tenant.path and parent.path.startswith(tenant.path):
        raise TreeError(
            f"cannot move {tenant.external_id!r} under {parent.external_id!r}: that tenant is in its own subtree"
        )
    subtree_height = 0
    if tenant.pk is not None and tenant.path:
        deepest = Tenant.objects.filter(path__startswith=tenant.path).order_by("-depth").values("depth").first()
        subtree_height = (deepest["depth"] if deepest else tenant.depth) - tenant.depth
    if parent.depth + 1 + subtree_height >= tenant_settings.MAX_TREE_DEPTH:
        raise TreeError(f"the tree would be deeper than {tenant_settings.MAX_TREE_DEPTH} levels")


def place_new(tenant: Tenant) -> None:
    """Give a freshly inserted tenant its path. Called by ``Tenant.save`` inside its transaction."""
    parent_path = tenant.parent.path if tenant.parent_id and tenant.parent else "/"
    tenant.path = f"{parent_path}{tenant.pk}/"
    tenant.depth = parent_path.count("/") - 1
    Tenant.objects.filter(pk=tenant.pk).update(path=tenant.path, depth=tenant.depth)


def move_tenant(tenant: Tenant | str, new_parent: Tenant | str | None) -> Tenant:
    """Move ``tenant`` and its whole subtree under ``new_parent`` (``None``: make it a root)."""
    with transaction.atomic():
        tenant_obj = get_tenant(tenant) if isinstance(tenant, str) else tenant
        parent_obj = get_tenant(new_parent) if isinstance(new_parent, str) else new_parent
        tenant_obj.parent = parent_obj
        tenant_obj.save()
        return tenant_obj


def relocate(tenant: Tenant, old_path: str) -> None:
    """Rewrite the paths of ``tenant``'s subtree after its parent changed. Called by ``Tenant.save``."""
    parent = tenant.parent
    old_root = int(old_path.strip("/").split("/")[0])
    new_root = parent.root_pk if parent else tenant.pk
    lock_trees([old_root, new_root], exclusive=True)
    if parent is not None:
        # Read again under the lock: the new parent may itself have moved meanwhile.
        parent.refresh_from_db(fields=["path", "depth"])
        if parent.root_pk != new_root:
            raise TreeError("the destination moved concurrently; try again")
    check_parent(tenant, parent)
    new_path = f"{parent.path if parent else '/'}{tenant.pk}/"
    old_ancestors = [int(pk) for pk in old_path.strip("/").split("/")[:-1]]
    new_ancestors = [int(pk) for pk in new_path.strip("/").split("/")[:-1]]
    depth_delta = new_path.count("/") - old_path.count("/")
    subtree_moving.send(sender=Tenant, tenant=tenant, root_pks={old_root, new_root})
    Tenant.objects.filter(path__startswith=old_path).update(
        path=Concat(Value(new_path), Substr("path", len(old_path) + 1)),
        depth=F("depth") + depth_delta,
    )
    tenant.path = new_path
    tenant.depth = new_path.count("/") - 2
    subtree_moved.send(
        sender=Tenant,
        tenant=tenant,
        old_ancestor_pks=old_ancestors,
        new_ancestor_pks=new_ancestors,
        root_pks={old_root, new_root},
    )
    transaction.on_commit(lambda: lineage.invalidate_subtree(new_path))
