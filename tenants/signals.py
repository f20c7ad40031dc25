"""Signals of the tenant tree, and the lineage cache's invalidation on commit."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import Signal, receiver

from .models import Tenant

# Sent inside the moving transaction, with both trees locked exclusively:
# tenant, old_ancestor_pks, new_ancestor_pks (root first, excluding the tenant), root_pks.
subtree_moved = Signal()
# Sent inside the moving transaction with both trees locked exclusively, before any path changes: tenant (its path
# still the old one), root_pks. Lets listeners settle work that depends on the old lineage first.
subtree_moving = Signal()


@receiver(post_save, sender=Tenant, dispatch_uid="xaas_tenants_invalidate_on_save")
def _invalidate_on_save(sender: type[Tenant], instance: Tenant, **kwargs: Any) -> None:
    from .lineage import invalidate_subtree

    path = instance.path
    if path:
        # A changed flag (active, exempt) or name is part of every descendant's cached lineage.
        transaction.on_commit(lambda: invalidate_subtree(path), using=kwargs.get("using"))


@receiver(post_delete, sender=Tenant, dispatch_uid="xaas_tenants_invalidate_on_delete")
def _invalidate_on_delete(sender: type[Tenant], instance: Tenant, **kwargs: Any) -> None:
    from .lineage import invalidate

    tenant_id = instance.external_id
    transaction.on_commit(lambda: invalidate([tenant_id]), using=kwargs.get("using"))
