"""``manage.py metering_status``: the delivery backlog, its oldest fact, dead letters, held facts and blocks; in log
mode also the drain lag (entries not yet persisted per tree and in all), log gaps and dead stream entries."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from metering import counters, drain, log
from metering.delivery import outbox
from metering.delivery.sinks.base import configured_sink_name, configured_sink_names
from metering.models import LogCursor, LogDeadEntry, LogGap
from tenants.models import Tenant

GAP_ALERT_HOURS = 24  # --check alerts on log gaps and dead entries this recent (the rows stay for the record)
SHOWN = 10


class Command(BaseCommand):
    help = "Show, per sink, the outbox backlog, the age of the oldest pending fact, dead letters and alerts."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Machine-readable output.")
        parser.add_argument(
            "--check", action="store_true", help="Exit with status 2 when there is an alert (blocked, dead, held)."
        )
        parser.add_argument(
            "--no-lago",
            action="store_true",
            help="Do not ask Lago whether the facts waiting to be sent fall inside their subscriptions' boundaries.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        now = timezone.now()
        configured = configured_sink_name()
        every = configured_sink_names()  # METERING["SINKS"], else the adapter's own
        names = sorted(set(outbox.sinks_in_use()) | set(every))
        statuses = [outbox.status(name, now=now) for name in names]
        unbillable = [] if options["no_lago"] else self._unbillable(every, statuses)
        drained = self._log_status(now)
        if options["json"]:
            payload: dict[str, Any] = {
                "configured_sink": configured,
                "configured_sinks": every,
                "sinks": [status.as_dict(now) for status in statuses],
            }
            if drained is not None:
                payload["log"] = drained
            if unbillable:
                payload["not_billable"] = [item.__dict__ for item in unbillable]
            self.stdout.write(json.dumps(payload, indent=2, default=str))
        else:
            label = "configured sinks" if len(every) > 1 else "configured sink"
            self.stdout.write(f"{label}: {', '.join(every) or 'none (database adapter)'}")
            for status in statuses:
                self._describe(status, every, now)
            for item in unbillable:
                self.stdout.write(f"  WARNING (not billable): {item.describe()}")
            if drained is not None:
                self._describe_log(drained)
        log_alerts = bool(drained and drained["alerts"])
        if options["check"] and (any(status.alerts for status in statuses) or log_alerts or unbillable):
            raise CommandError("delivery needs attention", returncode=2)

    @staticmethod
    def _unbillable(every: list[str], statuses: list[outbox.SinkStatus]) -> list[Any]:
        """Lago only (the adapter's sink or one of METERING["SINKS"]): facts waiting to be sent that fall outside
        their subscription's boundaries, asked of Lago within one overall deadline; nothing when Lago is blocked or
        does not answer."""
        if "lago" not in every or not any(
            s.sink == "lago" and s.blocked_at is None and (s.counts[outbox.PENDING] or s.counts[outbox.HELD])
            for s in statuses
        ):
            return []
        from metering.delivery.reconcile_lago import unbillable_before_sending

        return unbillable_before_sending()[0]

    def _log_status(self, now: Any) -> dict[str, Any] | None:
        """Log mode's drain lag, gaps and dead entries (``None`` outside log mode with nothing logged ever)."""
        if not log.is_log_mode() and not LogCursor.objects.exists():
            return None
        recent = now - timedelta(hours=GAP_ALERT_HOURS)
        gaps = list(LogGap.objects.select_related("root").order_by("-detected_at")[:SHOWN])
        dead = list(LogDeadEntry.objects.select_related("root").order_by("-detected_at")[:SHOWN])
        result: dict[str, Any] = {
            "gaps": LogGap.objects.count(),
            "dead_entries": LogDeadEntry.objects.count(),
            "recent_gaps": [
                {
                    "tenant_id": gap.root.external_id,
                    "detected_at": gap.detected_at.isoformat(),
                    "generation": gap.generation,
                    "after_entry": gap.after_entry,
                    "last_drained_at": gap.last_drained_at.isoformat() if gap.last_drained_at else None,
                    "note": gap.note,
                }
                for gap in gaps
            ],
            "recent_dead_entries": [
                {"tenant_id": row.root.external_id, "entry_id": row.entry_id, "reason": row.reason} for row in dead
            ],
            "alerts": [],
        }
        try:
            totals = drain.pending()
            names = dict(
                Tenant.objects.filter(pk__in=[t["root_pk"] for t in totals["trees"]]).values_list("pk", "external_id")
            )
            for tree in totals["trees"]:
                tree["tenant_id"] = names.get(tree["root_pk"], f"#{tree['root_pk']}")
            result.update(pending=totals["entries"], oldest_pending_age_seconds=totals["oldest_age_seconds"])
            result["trees"] = totals["trees"]
        except (drain.LogUnavailable, counters.RedisError) as error:
            result.update(pending=None, oldest_pending_age_seconds=None, trees=[])
            result["alerts"].append(f"Redis unavailable, drain lag unknown: {type(error).__name__}")
        if any(gap.detected_at >= recent for gap in gaps):
            result["alerts"].append(f"log gaps detected in the last {GAP_ALERT_HOURS} hours: facts may be missing")
        if any(row.detected_at >= recent for row in dead):
            result["alerts"].append(f"dead stream entries in the last {GAP_ALERT_HOURS} hours")
        return result

    def _describe_log(self, data: dict[str, Any]) -> None:
        self.stdout.write("\nlog mode drain")
        age = data["oldest_pending_age_seconds"]
        pending = "unknown" if data["pending"] is None else data["pending"]
        self.stdout.write(
            f"  pending entries {pending}, oldest {'-' if age is None else f'{age:.1f}s'} ago; "
            f"log gaps {data['gaps']}, dead entries {data['dead_entries']}"
        )
        for tree in data["trees"]:
            tree_age = tree["oldest_age_seconds"]
            shown = "-" if tree_age is None else f"{tree_age:.1f}s"
            self.stdout.write(f"  tree {tree['tenant_id']}: {tree['entries']} pending, oldest {shown} ago")
        for gap in data["recent_gaps"]:
            self.stdout.write(
                f"  GAP {gap['tenant_id']} detected {gap['detected_at']}: after entry {gap['after_entry']} of "
                f"{gap['generation']} (drained until {gap['last_drained_at'] or 'never'})"
            )
        for row in data["recent_dead_entries"]:
            self.stdout.write(f"  dead entry {row['tenant_id']} {row['entry_id']}: {row['reason']}")
        for alert in data["alerts"]:
            self.stdout.write(f"  ALERT: {alert}")

    def _describe(self, status: outbox.SinkStatus, configured: list[str], now: Any) -> None:
        data = status.as_dict(now)
        counts = status.counts
        self.stdout.write(f"\n{status.sink}{'' if status.sink in configured else ' (not configured: not delivered)'}")
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
