"""``manage.py lago_sync``: create or update, idempotently, the Lago customers, subscriptions and billable metrics
that billing the tenants needs, and write the subscription ids back."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering.conf import metering_settings
from tenants.models import Tenant


class Command(BaseCommand):
    help = (
        "For each billing tenant (default: every root tenant), a Lago customer and its subscription on --plan; for "
        "each metered feature, a billable metric (sum_agg over the quantity property). --dry-run prints the plan."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("tenant_ids", nargs="*", metavar="TENANT_ID", help="Billing tenants (default: roots).")
        parser.add_argument("--plan", required=True, help="The Lago plan code new subscriptions are created on.")
        parser.add_argument("--feature", action="append", help="Only these features (default: all metered ones).")
        parser.add_argument("--dry-run", action="store_true", help="Print what would change, change nothing.")

    def handle(self, *args: Any, **options: Any) -> None:
        from metering.delivery.lago_sync import LagoSyncError, sync
        from metering.delivery.sinks import SinkNotConfigured, get_sink
        from metering.delivery.sinks.lago import LagoSink

        try:
            sink = get_sink("lago")
        except SinkNotConfigured as error:
            raise CommandError(str(error)) from error
        if not isinstance(sink, LagoSink) or sink.configuration_error():
            raise CommandError(sink.configuration_error() if sink else "the Lago sink is not configured")
        using = str(metering_settings.DATABASE_ALIAS)
        if options["tenant_ids"]:
            tenants = list(Tenant.objects.using(using).filter(external_id__in=options["tenant_ids"]))
            missing = sorted(set(options["tenant_ids"]) - {tenant.external_id for tenant in tenants})
            if missing:
                raise CommandError(f"unknown tenants: {', '.join(missing)}")
        else:
            tenants = list(Tenant.objects.using(using).filter(parent__isnull=True))
        tenants.sort(key=lambda tenant: tenant.external_id)
        try:
            report = sync(tenants, options["plan"], options["feature"], dry_run=options["dry_run"])
        except LagoSyncError as error:
            raise CommandError(f"Lago refused or did not answer: {error}") from error
        for line in report.changes:
            self.stdout.write(line)
        for line in report.warnings:
            self.stdout.write(f"WARNING: {line}")
        verb = "to change" if options["dry_run"] else "changed"
        self.stdout.write(f"{len(report.changes)} {verb}, {len(report.unchanged)} unchanged")
