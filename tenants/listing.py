"""The tree as text: a subtree's rows in pre-order, each labelled with its kind and flags.

Shared by ``manage.py tenant tree`` (the tree alone) and metering's ``manage.py usage --tree`` (the tree with each
tenant's usage): tenants sits below metering, so the usage column is metering's to add.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from .models import Tenant
from .tree import get_tenant


def subtree_rows(root_id: str | None = None) -> list[Tenant]:
    """Every tenant (``root_id``: that tenant's subtree), with the fields ``label`` and ``walk`` read."""
    tenants = Tenant.objects.all()
    if root_id is not None:
        tenants = tenants.filter(path__startswith=get_tenant(root_id).path)
    return list(tenants.only("pk", "external_id", "kind", "exempt", "is_active", "parent_id"))


def label(tenant: Tenant) -> str:
    """``id (kind) [exempt] [inactive]``."""
    line = tenant.external_id
    if tenant.kind:
        line += f" ({tenant.kind})"
    if tenant.exempt:
        line += " [exempt]"
    if not tenant.is_active:
        line += " [inactive]"
    return line


def walk(rows: list[Tenant]) -> Iterator[tuple[int, Tenant]]:
    """Pre-order with depth relative to the top, siblings by id.

    Built from the parent links rather than trusting ``ORDER BY path``: whether "/1/10/5/" sorts before "/1/100/"
    depends on the database collation, which may ignore the slashes.
    """
    present = {row.pk for row in rows}
    children: dict[int | None, list[Tenant]] = defaultdict(list)
    for row in rows:
        # A tenant whose parent is outside the listing is a top of it (the roots, or the ROOT_ID asked for).
        children[row.parent_id if row.parent_id in present else None].append(row)
    for siblings in children.values():
        siblings.sort(key=lambda row: row.external_id)
    stack = [(0, row) for row in reversed(children[None])]
    while stack:
        depth, tenant = stack.pop()
        yield depth, tenant
        stack.extend((depth + 1, child) for child in reversed(children.get(tenant.pk, [])))
