"""``manage.py seed_demo``: the example project's demo — a tenant tree, 30 days of usage, quotas that show every
state (refused soon, soft, exempt), an admin login and an API key. Safe to run again.

It lives in the example project (``project``), not in the reusable apps: a host project never gets a command that
creates users. It never changes an existing user (password, flags) nor an existing quota: it only adds what is
missing, so an operator's changes survive a rerun.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering import DuplicateUsageEvent, InvalidUsageEvent, UsageEvent, get_meter
from quotas.models import QuotaLimit
from tenants.exceptions import TenantError
from tenants.models import Tenant
from tenants.tree import create_tenant

FEATURE = "llm_tokens"

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

# Today's usage per key (the daily quotas below are set from it). The demo request costs 3 tokens
# ("hello metered world"), so acme-chat-key-1 answers 429 from the 5th request of the day on.
TODAY: dict[str, int] = {
    "acme-chat-key-1": 1500,
    "acme-chat-key-2": 450,
    "acme-search-key-1": 800,
    "acme-search-key-2": 120,
    "internal-batch": 5000,
}
KEY_1_HEADROOM = 12
# The mean daily usage of each key over the 30 days of history (each day varies around it).
HISTORY: dict[str, int] = {
    "acme-chat-key-1": 900,
    "acme-chat-key-2": 400,
    "acme-search-key-1": 700,
    "acme-search-key-2": 150,
    "internal-batch": 4000,
}
HISTORY_DAYS = 30


@dataclass(frozen=True)
class Quota:
    tenant_id: str
    limit: int
    period: str
    enforcement: str = QuotaLimit.Enforcement.HARD


# Every state the admin shows: a key close to its daily limit (refused within a few requests), one with room, monthly
# limits on the organization and a project, a soft (warn only) limit already passed, and an exempt subtree whose
# passed limit refuses nothing.
QUOTAS: list[Quota] = [
    Quota("acme", 120_000, QuotaLimit.Period.MONTH),
    Quota("acme-chat", 45_000, QuotaLimit.Period.MONTH),
    Quota("acme-chat-key-1", TODAY["acme-chat-key-1"] + KEY_1_HEADROOM, QuotaLimit.Period.DAY),
    Quota("acme-chat-key-2", 2_000, QuotaLimit.Period.DAY),
    Quota("acme-search", 800, QuotaLimit.Period.DAY, QuotaLimit.Enforcement.SOFT),  # today: 920, warned only
    Quota("internal", 4_000, QuotaLimit.Period.DAY),  # today: 5,000, refused nothing: internal is exempt
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
DEMO_KEY_FILE = "demo-api-key"


def daily_amount(tenant_id: str, day: datetime) -> int:
    """A stable pseudo-random amount around the key's mean (the same on every rerun): charts get some shape."""
    digest = hashlib.sha256(f"{tenant_id}:{day.date().isoformat()}".encode()).digest()
    spread = digest[0] / 255  # 0..1
    weekend = day.weekday() >= 5
    return max(1, int(HISTORY[tenant_id] * (0.5 + spread) * (0.4 if weekend else 1.0)))


class Command(BaseCommand):
    help = "Create the demo tree (acme, internal), 30 days of llm_tokens usage, quotas, an admin login and an API key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"), help="host printed in the URLs")
        parser.add_argument("--port", default=os.environ.get("PORT", "8000"), help="port printed in the URLs")

    def handle(self, *args: Any, **options: Any) -> None:
        base_url = f"http://{options['host']}:{options['port']}"
        try:
            created = self.seed_tenants()
            recorded, already = self.seed_usage()
            quotas = self.seed_quotas()
        except (TenantError, InvalidUsageEvent) as error:
            raise CommandError(str(error)) from error
        except ValidationError as error:
            raise CommandError(" ".join(error.messages)) from error
        admin_line = self.seed_admin()
        scoped_line = self.seed_scoped_admin()
        api_key = self.seed_api_key()
        out = self.stdout.write
        out(f"tenants: {created} created, {len(TENANTS) - created} already there")
        out(f"usage events: {recorded} recorded, {already} already there")
        out(f"quotas: {quotas} created, {len(QUOTAS) - quotas} already there")
        out("")
        out(f"admin:    {base_url}/admin/")
        out(f"username: {ADMIN_USERNAME}")
        out(admin_line)
        out(f"tenant-scoped administrator of acme-chat: {SCOPED_USERNAME} / {scoped_line}")
        out("")
        out(f"API key of acme-chat (shown once): {api_key}")
        out(
            f"  curl '{base_url}/api/v1/usage?tenant_id=acme-chat-key-1&feature={FEATURE}' "
            f"-H 'Authorization: Bearer {api_key}'"
        )
        out(f"  API docs: {base_url}/api/docs/")
        out("")
        out("try (the key acts for acme-chat; X-Tenant-ID narrows it to a tenant below, never outside).")
        out(f"acme-chat-key-1 is {KEY_1_HEADROOM} tokens below its daily limit: the 5th call of the day answers 429:")
        out(
            f"  for i in 1 2 3 4 5; do curl -s -o /dev/null -w '%{{http_code}}\\n' -X POST {base_url}/demo/completions "
            f"-H 'Authorization: Bearer {api_key}' -H 'X-Tenant-ID: acme-chat-key-1' "
            "-H 'Content-Type: application/json' -d '{\"prompt\": \"hello metered world\"}'; done"
        )
        saved = self.save_private(DEMO_KEY_FILE, api_key)
        if saved is not None:
            out(f"(the key is also in {saved}, for `make run`; the next seed_demo revokes it)")

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

    def seed_usage(self) -> tuple[int, int]:
        """Today's usage and the 30 days before it. Transaction ids name the day, so a rerun records nothing twice
        and a run on a later day adds only the days that are missing."""
        meter = get_meter()
        now = datetime.now(UTC)
        events: list[UsageEvent] = []
        for tenant_id, amount in TODAY.items():
            today = now.date().isoformat()
            events.append(self.event(tenant_id, amount, now - timedelta(seconds=5), f"seed-{tenant_id}-{today}"))
        for days_ago in range(1, HISTORY_DAYS + 1):
            day = datetime.combine((now - timedelta(days=days_ago)).date(), time(12), tzinfo=UTC)
            for tenant_id in HISTORY:
                amount = daily_amount(tenant_id, day)
                events.append(self.event(tenant_id, amount, day, f"seed-{tenant_id}-{day.date().isoformat()}"))
        recorded = already = 0
        for event in events:
            try:
                meter.record_usage_sync(event)
                recorded += 1
            except DuplicateUsageEvent:
                already += 1
        return recorded, already

    @staticmethod
    def event(tenant_id: str, amount: int, timestamp: datetime, transaction_id: str) -> UsageEvent:
        return UsageEvent(
            tenant_id, FEATURE, amount, timestamp=timestamp, metadata={"seed": "demo"}, transaction_id=transaction_id
        )

    def seed_quotas(self) -> int:
        created = 0
        for quota in QUOTAS:
            _, was_created = QuotaLimit.objects.get_or_create(
                tenant=Tenant.objects.get(external_id=quota.tenant_id),
                feature=FEATURE,
                period=quota.period,
                defaults={"limit": Decimal(quota.limit), "enforcement": quota.enforcement},
            )
            created += was_created
        return created

    def seed_admin(self) -> str:
        """The superuser ``admin``, created once with a random password (or ``DEMO_ADMIN_PASSWORD``). An existing
        ``admin`` is never changed: its password, its flags stay as they are."""
        user_model = get_user_model()
        if user_model.objects.filter(username=ADMIN_USERNAME).exists():
            return "password: (unchanged: this user already existed; `manage.py changepassword admin` sets one)"
        password = os.environ.get("DEMO_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        user_model.objects.create_superuser(ADMIN_USERNAME, "admin@example.com", password)
        return f"password: {password}"

    def seed_scoped_admin(self) -> str:
        """A staff user bound to acme-chat: sees and edits only that subtree, never raises its own limits.
        Created once, with its group's permissions and its scope; on a rerun neither the user, nor the group's
        permissions, nor the scope are touched (an operator's revocations stay revoked)."""
        from django.contrib.auth.models import Group, Permission

        from tenants.models import TenantAdminScope

        group, group_created = Group.objects.get_or_create(name="Tenant administrators")
        if group_created:
            for app_label, model, actions in SCOPED_PERMISSIONS:
                group.permissions.add(
                    *Permission.objects.filter(
                        content_type__app_label=app_label, codename__in=[f"{action}_{model}" for action in actions]
                    )
                )
        user_model = get_user_model()
        if user_model.objects.filter(username=SCOPED_USERNAME).exists():
            return "(password unchanged: this user already existed)"
        password = os.environ.get("DEMO_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        user = user_model.objects.create_user(SCOPED_USERNAME, password=password, is_staff=True)
        user.groups.add(group)
        TenantAdminScope.objects.create(user=user, tenant=Tenant.objects.get(external_id="acme-chat"))
        return password

    def seed_api_key(self) -> str:
        """A fresh demo key for acme-chat on every run; the previous demo keys are revoked (keys are shown once)."""
        from tenants.apikeys import create_api_key, revoke
        from tenants.models import ApiKey

        for old in ApiKey.objects.filter(tenant__external_id="acme-chat", name="demo", revoked_at__isnull=True):
            revoke(old.prefix)
        return create_api_key("acme-chat", name="demo")[1]

    @staticmethod
    def save_private(name: str, value: str) -> Path | None:
        """Keep ``value`` where ``make run`` reads it (the project's ``VAR_DIR``), readable by its owner only."""
        var_dir = getattr(settings, "VAR_DIR", None)
        if var_dir is None:
            return None
        path = Path(var_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # Never through a symlink planted there, and owner-only even when the file existed with wider modes.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(value + "\n")
        return path
