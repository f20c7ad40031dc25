"""``manage.py tenant add|move|tree``: shape and inspect the tenant tree from the shell."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering.usage import usage_by_tenant_and_feature
from tenants.exceptions import TenantError
from tenants.models import Tenant
from tenants.tree import create_tenant, get_tenant, move_tenant


def validation_message(error: ValidationError) -> str:
    if hasattr(error, "error_dict"):
        return "; ".join(f"{field}: {' '.join(messages)}" for field, messages in error.message_dict.items())
    return " ".join(error.messages)


def lineage_of(tenant: Tenant) -> str:
    """``root/.../tenant`` read from the database, not the lineage cache, which a move invalidates only on commit."""
    ids = dict(Tenant.objects.filter(pk__in=tenant.ancestor_pks).values_list("pk", "external_id"))
    return "/".join(ids[pk] for pk in tenant.ancestor_pks)


def format_quantity(quantity: Decimal) -> str:
    # Fixed-point: a normalized Decimal would print 10 as "1E+1".
    return format(quantity, "f")


class Command(BaseCommand):
    help = "Add, move and list tenants."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, title="actions")

        add = actions.add_parser("add", help="Create a tenant.")
        add.add_argument("tenant_id")
        add.add_argument("--parent", help="Id of the parent tenant (default: a new root).")
        add.add_argument("--name", default="")
        add.add_argument("--kind", default="", help="Free text: organization, project, key ...")
        add.add_argument("--exempt", action="store_true", help="Record usage of its subtree but never block it.")

        move = actions.add_parser("move", help="Move a tenant and its whole subtree.")
        move.add_argument("tenant_id")
        destination = move.add_mutually_exclusive_group(required=True)
        destination.add_argument("--parent", help="Id of the new parent.")
        destination.add_argument("--root", action="store_true", help="Make the tenant a root.")

        tree = actions.add_parser("tree", help="Print the tree with this month's usage (UTC).")
        tree.add_argument("root_id", nargs="?", help="Print only this tenant's subtree.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            if options["action"] == "add":
                self.add(options)
            elif options["action"] == "move":
                self.move(options)
            else:
                self.tree(options["root_id"])
        except TenantError as error:
            raise CommandError(str(error)) from error
        except ValidationError as error:
            raise CommandError(validation_message(error)) from error

    def add(self, options: dict[str, Any]) -> None:
        tenant = create_tenant(
            options["tenant_id"],
            parent=options["parent"],
            name=options["name"],
            kind=options["kind"],
            exempt=options["exempt"],
        )
        self.stdout.write(f"created {lineage_of(tenant)}")

    def move(self, options: dict[str, Any]) -> None:
        tenant = move_tenant(options["tenant_id"], None if options["root"] else options["parent"])
        self.stdout.write(f"moved {lineage_of(tenant)}")

    def tree(self, root_id: str | None) -> None:
        tenants = Tenant.objects.all()
        if root_id is not None:
            tenants = tenants.filter(path__startswith=get_tenant(root_id).path)
        rows = list(tenants.only("pk", "external_id", "kind", "exempt", "is_active", "parent_id"))
        if not rows:
            self.stdout.write("no tenants")
            return
        usage = usage_by_tenant_and_feature([row.pk for row in rows], "month", datetime.now(UTC))
        for depth, tenant in walk(rows):
            line = "  " * depth + tenant.external_id
            if tenant.kind:
                line += f" ({tenant.kind})"
            if tenant.exempt:
                line += " [exempt]"
            if not tenant.is_active:
                line += " [inactive]"
            features = usage.get(tenant.pk, {})
            if features:
                line += "  " + " ".join(f"{name}={format_quantity(qty)}" for name, qty in sorted(features.items()))
            self.stdout.write(line)


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
