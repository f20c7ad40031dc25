"""``manage.py seed_demo``: a small demo tree, a little usage and an admin login. Safe to run again.

In quotas, the top of the stack: the demo's tenant administrator is given permissions on every app's models."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from metering import DuplicateUsageEvent, InvalidUsageEvent, UsageEvent, get_meter
from tenants.exceptions import TenantError
from tenants.models import Tenant
from tenants.tree import create_tenant

# (id, parent id, name, kind, exempt), parents before children.
TENANTS: list[tuple[str, str | None, str, str, bool]] = [
    ("acme", None, "Acme Inc.", "organization", False),
    ("acme-chat", "acme", "Acme Chat", "project", False),
    ("acme-chat-key-1", "acme-chat", "Chat key 1", "key", False),
    ("acme-chat-key-2", "acme-chat", "Chat key 2", "key", False),
    ("acme-search", "acme", "Acme Search", "project", False),
    ("acme-search-key-1", "acme-search", "Search key 1", "key", False),
    ("acme-search-key-2", "acme-search", "Search key 2", "key", False),
    # Exempt: its usage is recorded but never blocked, whatever the quotas.
    ("internal", None, "Internal", "organization", True),
    ("internal-batch", "internal", "Batch jobs", "key", False),
]

# (transaction id, tenant id, llm_tokens). Fixed transaction ids make a rerun a no-op instead of a double count.
USAGE: list[tuple[str, str, int]] = [
    ("seed-1", "acme-chat-key-1", 1200),
    ("seed-2", "acme-chat-key-1", 300),
    ("seed-3", "acme-chat-key-2", 450),
    ("seed-4", "acme-search-key-1", 800),
    ("seed-5", "internal-batch", 5000),
]

ADMIN_USERNAME = "admin"
SCOPED_USERNAME = "chat-admin"
# What a tenant administrator is given through its group; its TenantAdminScope narrows it to one subtree.
SCOPED_PERMISSIONS = [
    ("xaas_tenants", "tenant", ("view", "add", "change")),
    ("xaas_tenants", "apikey", ("view", "add", "change")),
    ("xaas_quotas", "quotalimit", ("view", "add", "change", "delete")),
    ("xaas_quotas", "quotareservation", ("view",)),
    ("xaas_metering", "usagerecord", ("view",)),
    ("xaas_metering", "usagerollup", ("view",)),
]
BASE_URL = "http://127.0.0.1:8000"
DEMO_KEY_FILE = "demo-api-key"


class Command(BaseCommand):
    help = "Create the demo tenants (acme, internal), some llm_tokens usage and the superuser 'admin'."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            created = self.seed_tenants()
            recorded = self.seed_usage()
        except (TenantError, InvalidUsageEvent) as error:
            raise CommandError(str(error)) from error
        except ValidationError as error:
            raise CommandError(" ".join(error.messages)) from error
        password = self.seed_admin()
        scoped_password = self.seed_scoped_admin()
        api_key = self.seed_api_key()
        self.stdout.write(f"tenants: {created} created, {len(TENANTS) - created} already there")
        self.stdout.write(f"usage events: {recorded} recorded, {len(USAGE) - recorded} already there")
        self.stdout.write("")
        self.stdout.write(f"admin:    {BASE_URL}/admin/")
        self.stdout.write(f"username: {ADMIN_USERNAME}")
        self.stdout.write(f"password: {password}")
        self.stdout.write(f"tenant-scoped administrator of acme-chat: {SCOPED_USERNAME} / {scoped_password}")
        self.stdout.write("")
        self.stdout.write(f"API key of acme-chat (shown once): {api_key}")
        self.stdout.write(
            f"  curl '{BASE_URL}/api/v1/usage?tenant_id=acme-chat-key-1&feature=llm_tokens' "
            f"-H 'Authorization: Bearer {api_key}'"
        )
        self.stdout.write(f"  API docs: {BASE_URL}/api/docs/")
        self.stdout.write("")
        self.stdout.write("try (the key acts for acme-chat; X-Tenant-ID narrows it to a tenant below, never outside):")
        self.stdout.write(
            f"  curl -X POST {BASE_URL}/demo/completions -H 'Authorization: Bearer {api_key}' "
            "-H 'X-Tenant-ID: acme-chat-key-1' "
            "-H 'Content-Type: application/json' -d '{\"prompt\": \"hello metered world\"}'"
        )
        saved = self.save_demo_key(api_key)
        if saved is not None:
            self.stdout.write(f"(the key is also in {saved}, for `make run`; the next seed_demo revokes it)")

    def seed_tenants(self) -> int:
        existing = set(
            Tenant.objects.filter(external_id__in=[row[0] for row in TENANTS]).values_list("external_id", flat=True)
        )
        created = 0
        for tenant_id, parent, name, kind, exempt in TENANTS:
            # An existing tenant is left as it is: the demo never undoes what someone changed since.
            if tenant_id not in existing:
                create_tenant(tenant_id, parent=parent, name=name, kind=kind, exempt=exempt)
                created += 1
        return created

    def seed_usage(self) -> int:
        meter = get_meter()
        recorded = 0
        for transaction_id, tenant_id, tokens in USAGE:
            try:
                meter.record_usage_sync(
                    UsageEvent(tenant_id, "llm_tokens", tokens, metadata={"seed": True}, transaction_id=transaction_id)
                )
                recorded += 1
            except DuplicateUsageEvent:
                pass
        return recorded

    def seed_scoped_admin(self) -> str:
        """A staff user bound to acme-chat: sees and edits only that subtree, never raises its own limits."""
        from django.contrib.auth.models import Group, Permission

        from tenants.models import TenantAdminScope

        group, _ = Group.objects.get_or_create(name="Tenant administrators")
        for app_label, model, actions in SCOPED_PERMISSIONS:
            group.permissions.add(
                *Permission.objects.filter(
                    content_type__app_label=app_label, codename__in=[f"{action}_{model}" for action in actions]
                )
            )
        password = os.environ.get("DEMO_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        user = get_user_model().objects.filter(username=SCOPED_USERNAME).first() or get_user_model()(
            username=SCOPED_USERNAME
        )
        user.is_staff, user.is_superuser, user.is_active = True, False, True
        user.set_password(password)
        user.save()
        user.groups.add(group)
        TenantAdminScope.objects.update_or_create(
            user=user, defaults={"tenant": Tenant.objects.get(external_id="acme-chat")}
        )
        return password

    def seed_api_key(self) -> str:
        """A fresh demo key for acme-chat on every run; the previous demo keys are revoked (keys are shown once)."""
        from tenants.apikeys import create_api_key, revoke
        from tenants.models import ApiKey

        for old in ApiKey.objects.filter(tenant__external_id="acme-chat", name="demo", revoked_at__isnull=True):
            revoke(old.prefix)
        return create_api_key("acme-chat", name="demo")[1]

    @staticmethod
    def save_demo_key(api_key: str) -> Path | None:
        """Keep the demo key where ``make run`` reads it (the project's ``VAR_DIR``), readable by its owner only."""
        var_dir = getattr(settings, "VAR_DIR", None)
        if var_dir is None:
            return None
        path = Path(var_dir) / DEMO_KEY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(api_key + "\n")
        return path

    def seed_admin(self) -> str:
        # A fresh random password on every run unless one is given, so no known default ever exists.
        password = os.environ.get("DEMO_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        user_model = get_user_model()
        user = user_model.objects.filter(username=ADMIN_USERNAME).first()
        if user is None:
            user_model.objects.create_superuser(ADMIN_USERNAME, "admin@example.com", password)
        else:
            user.is_staff = user.is_superuser = user.is_active = True
            user.set_password(password)
            user.save()
        return password
