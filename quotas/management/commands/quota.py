"""``manage.py quota set|list|check``."""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering.events import units_to_quantity
from metering.exceptions import InvalidQuantity, InvalidUsageEvent
from tenants.exceptions import TenantError
from tenants.tree import get_tenant

from ...handler import QuotaPolicyHandler
from ...models import QuotaLimit, limit_to_units


class Command(BaseCommand):
    help = "Set, list and check quota limits."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        set_parser = actions.add_parser("set", help="Create or change a limit.")
        set_parser.add_argument("tenant_id")
        set_parser.add_argument("feature")
        set_parser.add_argument("limit")
        set_parser.add_argument("--period", choices=[choice.value for choice in QuotaLimit.Period], default="month")
        set_parser.add_argument("--soft", action="store_true", help="Record and warn, never block.")
        list_parser = actions.add_parser("list", help="List limits (of a tenant's lineage when given).")
        list_parser.add_argument("tenant_id", nargs="?")
        list_parser.add_argument("--json", action="store_true", dest="as_json")
        check_parser = actions.add_parser("check", help="Would QTY fit at every level? Consumes nothing.")
        check_parser.add_argument("tenant_id")
        check_parser.add_argument("feature")
        check_parser.add_argument("quantity")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"handle_{options['action']}")(**options)
        except (TenantError, InvalidUsageEvent) as error:
            raise CommandError(str(error)) from error
        except ValidationError as error:
            raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in error.message_dict.items())) from error

    def handle_set(self, tenant_id: str, feature: str, limit: str, period: str, soft: bool, **_: Any) -> None:
        tenant = get_tenant(tenant_id)
        try:  # the API's grammar: ASCII digits, at most 6 decimals (Decimal() would take fullwidth digits or " 7 ")
            amount = units_to_quantity(limit_to_units(limit))
        except InvalidQuantity as error:
            raise CommandError(str(error).replace("quantity", "limit", 1)) from None
        quota = QuotaLimit.objects.filter(tenant=tenant, feature=feature, period=period).first() or QuotaLimit(
            tenant=tenant, feature=feature, period=period
        )
        quota.limit = amount
        quota.enforcement = QuotaLimit.Enforcement.SOFT if soft else QuotaLimit.Enforcement.HARD
        quota.is_active = True
        quota.full_clean()
        quota.save()
        self.stdout.write(
            f"{tenant_id} {feature}: {units_to_quantity(quota.limit_units)} per {period} ({quota.enforcement})"
        )

    def handle_list(self, tenant_id: str | None, as_json: bool, **_: Any) -> None:
        quotas = QuotaLimit.objects.select_related("tenant")
        if tenant_id:
            quotas = quotas.filter(tenant_id__in=get_tenant(tenant_id).ancestor_pks)
        rows = [
            {
                "tenant": quota.tenant.external_id,
                "feature": quota.feature,
                "limit": str(units_to_quantity(quota.limit_units)),
                "period": quota.period,
                "enforcement": quota.enforcement,
                "active": quota.is_active,
            }
            for quota in quotas
        ]
        if as_json:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for row in rows:
            flag = "" if row["active"] else "  (inactive)"
            self.stdout.write(
                f"{row['tenant']:<24} {row['feature']:<20} {row['limit']:>14} / {row['period']:<5} "
                f"{row['enforcement']}{flag}"
            )
        if not rows:
            self.stdout.write("no quotas")

    def handle_check(self, tenant_id: str, feature: str, quantity: str, **_: Any) -> None:
        decision = QuotaPolicyHandler(tenant_id).check(feature, quantity)
        for status in decision.statuses:
            self.stdout.write(
                f"{status.tenant_id:<24} {status.period:<5} used {status.used} of {status.limit}, "
                f"remaining {status.remaining}"
            )
        if decision.allowed:
            self.stdout.write(f"allowed: {quantity} {feature} fits at every level")
        else:
            blocked = decision.blocked
            assert blocked is not None
            raise CommandError(f"blocked at {blocked.tenant_id} ({blocked.period}): {blocked}")
