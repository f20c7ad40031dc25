"""``manage.py metering_status``: the delivery backlog, its oldest fact, dead letters, held facts and blocks."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from metering.delivery import outbox
from metering.delivery.sinks.base import configured_sink_name


class Command(BaseCommand):
    help = "Show, per sink, the outbox backlog, the age of the oldest pending fact, dead letters and alerts."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Machine-readable output.")
        parser.add_argument(
            "--check", action="store_true", help="Exit with status 2 when there is an alert (blocked, dead, held)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        now = timezone.now()
        configured = configured_sink_name()
        names = sorted(set(outbox.sinks_in_use()) | ({configured} if configured else set()))
        statuses = [outbox.status(name, now=now) for name in names]
        if options["json"]:
            payload = {"configured_sink": configured, "sinks": [status.as_dict(now) for status in statuses]}
            self.stdout.write(json.dumps(payload, indent=2))
        else:
            self.stdout.write(f"configured sink: {configured or 'none (database adapter)'}")
            for status in statuses:
                self._describe(status, configured, now)
        if options["check"] and any(status.alerts for status in statuses):
            raise CommandError("delivery needs attention", returncode=2)

    def _describe(self, status: outbox.SinkStatus, configured: str | None, now: Any) -> None:
        data = status.as_dict(now)
        counts = status.counts
        self.stdout.write(f"\n{status.sink}{'' if status.sink == configured else ' (not configured: not delivered)'}")
        self.stdout.write(
            f"  pending {counts[outbox.PENDING]} (due now {status.due}), delivered {counts[outbox.DELIVERED]}, "
            f"dead {counts[outbox.DEAD]}, held {counts[outbox.HELD]}"
        )
        age = data["oldest_pending_age_seconds"]
        oldest = "-" if age is None else f"{age:.0f}s ago ({data['oldest_pending_at']})"
        self.stdout.write(f"  oldest pending: {oldest}")
        self.stdout.write(
            f"  last success: {data['last_success_at'] or '-'}, last failure: {data['last_failure_at'] or '-'}"
        )
        if status.last_error:
            self.stdout.write(f"  last error: {status.last_error}")
        for alert in status.alerts:
            self.stdout.write(f"  ALERT: {alert}")
        if status.held_tenants:
            self.stdout.write(f"  held tenants: {', '.join(status.held_tenants)}")
        for dead in status.dead_samples:
            self.stdout.write(
                f"  dead #{dead['record_id']} {dead['tenant_id']}/{dead['transaction_id']} "
                f"after {dead['attempts']} attempts: {dead['error']}"
            )
