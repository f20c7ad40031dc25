"""``manage.py apikey create|revoke|list``: issue API keys (shown once), revoke them, list them (never the secret)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenants.apikeys import create_api_key, revoke
from tenants.exceptions import TenantError
from tenants.models import ApiKey
from tenants.tree import get_tenant


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise CommandError(f"--expires-in-days must be a whole number of days, got {value!r}") from None
    if number < 1:
        raise CommandError("--expires-in-days must be at least 1")
    return number


def key_state(key: ApiKey) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.is_expired():
        return "expired"
    return "active"


class Command(BaseCommand):
    help = "Create, revoke and list the API keys of tenants."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, title="actions")
        create = actions.add_parser("create", help="Create a key for a tenant; prints it once.")
        create.add_argument("tenant_id")
        create.add_argument("--name", default="", help="What the key is for.")
        create.add_argument("--expires-in-days", type=str, default=None, help="Expire after this many days.")
        revoke_parser = actions.add_parser("revoke", help="Revoke a key by its prefix (or the whole key).")
        revoke_parser.add_argument("prefix")
        listing = actions.add_parser("list", help="List keys (of one tenant when given); never the secrets.")
        listing.add_argument("tenant_id", nargs="?")
        listing.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"handle_{options['action']}")(**options)
        except TenantError as error:
            raise CommandError(str(error)) from error

    def handle_create(self, tenant_id: str, name: str, expires_in_days: str | None, **_: Any) -> None:
        days = _positive_int(expires_in_days) if expires_in_days is not None else None
        key, plaintext = create_api_key(
            get_tenant(tenant_id), name=name, expires_in=timedelta(days=days) if days else None
        )
        expiry = key.expires_at.isoformat() if key.expires_at else "never"
        self.stderr.write(f"API key {key.prefix} for {tenant_id} (expires: {expiry}). Store it now: it is shown once.")
        self.stdout.write(plaintext)

    def handle_revoke(self, prefix: str, **_: Any) -> None:
        key = revoke(prefix)
        self.stdout.write(f"revoked {key.prefix} of {key.tenant.external_id} at {key.revoked_at:%Y-%m-%d %H:%M:%S}Z")

    def handle_list(self, tenant_id: str | None, json: bool, **_: Any) -> None:
        keys = ApiKey.objects.select_related("tenant").order_by("tenant__path", "created_at")
        if tenant_id:
            keys = keys.filter(tenant=get_tenant(tenant_id))
        rows = [
            {
                "prefix": key.prefix,
                "tenant": key.tenant.external_id,
                "name": key.name,
                "state": key_state(key),
                "created_at": key.created_at.isoformat(),
                "expires_at": key.expires_at.isoformat() if key.expires_at else None,
                "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
                "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
            }
            for key in keys
        ]
        if json:
            self.stdout.write(_dumps(rows))
            return
        if not rows:
            self.stdout.write("no API keys")
            return
        for row in rows:
            expires = row["expires_at"][:19] if row["expires_at"] else "never"
            self.stdout.write(
                f"{row['prefix']:<10} {row['tenant']:<24} {row['state']:<8} expires {expires:<19} {row['name']}"
            )


def _dumps(value: object) -> str:
    return json.dumps(value, indent=2)
