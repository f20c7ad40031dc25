"""``manage.py tenant add|move|tree``: shape and inspect the tenant tree from the shell.

The tree with each tenant's usage is metering's: ``manage.py usage --tree [TENANT_ID]`` (tenants does not import
metering)."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenants.exceptions import TenantError
from tenants.listing import label, subtree_rows, walk
from tenants.models import Tenant
from tenants.tree import create_tenant, move_tenant


def validation_message(error: ValidationError) -> str:
    if hasattr(error, "error_dict"):
        return "; ".join(f"{field}: {' '.join(messages)}" for field, messages in error.message_dict.items())
    return " ".join(error.messages)


def lineage_of(tenant: Tenant) -> str:
    """``root/.../tenant`` read from the database, not the lineage cache, which a move invalidates only on commit."""
    ids = dict(Tenant.objects.filter(pk__in=tenant.ancestor_pks).values_list("pk", "external_id"))
    return "/".join(ids[pk] for pk in tenant.ancestor_pks)


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

        tree = actions.add_parser("tree", help="Print the tree (with usage: manage.py usage --tree).")
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
        rows = subtree_rows(root_id)
        if not rows:
            self.stdout.write("no tenants")
            return
        for depth, tenant in walk(rows):
            self.stdout.write("  " * depth + label(tenant))
