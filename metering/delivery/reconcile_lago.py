"""Reconciliation against Lago: what the plugin delivered, per subscription x code x day, against what Lago holds
(its events list, ``GET /api/v1/events``), and the delivered facts Lago accepted but will not bill (their timestamp
falls outside their subscription's boundaries, ``GET /api/v1/subscriptions/{id}``).

The delivered side is read from the frozen bodies of the delivered outbox rows (``UsageOutbox.body``), so it is
exactly what was sent, whatever the settings say today. Read-only on both sides.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.db.models import Q

from ..conf import metering_settings
from ..models import UsageOutbox
from .sinks.lago import LagoSink, lago_instant, same_properties

EARLIEST = datetime.min.replace(tzinfo=UTC)  # an unreadable timestamp (never sent by this plugin)


class LagoUnavailable(Exception):
    """Lago did not answer a reconciliation request usably (the message says which and why)."""


@dataclass
class DayReport:
    subscription: str
    code: str
    day: date
    delivered: int = 0
    held: int = 0
    missing: list[str] = field(default_factory=list)
    """Delivered, but Lago holds no event with that transaction_id here."""
    unexpected: list[str] = field(default_factory=list)
    """Lago holds them, the plugin never delivered them (another sender, or a fact deleted here)."""
    differing: list[str] = field(default_factory=list)
    """Lago holds another event (properties) under the delivered transaction_id."""
    duplicated: list[str] = field(default_factory=list)
    """Lago holds the transaction_id more than once (billed more than once)."""
    not_billable: list[str] = field(default_factory=list)
    """Accepted, not billable: outside the subscription's boundaries."""

    @property
    def differs(self) -> bool:
        return bool(self.missing or self.unexpected or self.differing or self.duplicated or self.not_billable)


@dataclass
class Reconciliation:
    days: list[DayReport]
    unverifiable: int = 0
    """Delivered rows without a frozen body (delivered before bodies were stored): not compared."""
    boundaries_unknown: list[str] = field(default_factory=list)
    """Subscriptions Lago did not describe: their facts' billability was not checked."""

    @property
    def differences(self) -> list[DayReport]:
        return [day for day in self.days if day.differs]


def _instant(value: Any) -> datetime | None:
    return lago_instant(value)


def reconcile(since: date | None = None, until: date | None = None, sink: LagoSink | None = None) -> Reconciliation:
    """Compare the delivered facts of days ``since``..``until`` (inclusive, UTC; default: all) with Lago."""
    sink = sink or LagoSink()
    rows = UsageOutbox.objects.using(str(metering_settings.DATABASE_ALIAS)).filter(sink=sink.name, state="delivered")
    if since is not None:
        rows = rows.filter(record__timestamp__gte=datetime.combine(since, time.min, tzinfo=UTC))
    if until is not None:
        rows = rows.filter(record__timestamp__lt=datetime.combine(until + timedelta(days=1), time.min, tzinfo=UTC))
    sent: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    unverifiable = 0
    for body in rows.values_list("body", flat=True).iterator(chunk_size=2000):
        if not body:
            unverifiable += 1
            continue
        event = json.loads(body)
        sent[(str(event.get("external_subscription_id") or ""), str(event["code"]))][event["transaction_id"]] = event
    days: dict[tuple[str, str, date], DayReport] = {}

    def day_report(subscription: str, code: str, moment: datetime) -> DayReport:
        key = (subscription, code, moment.date())
        if key not in days:
            days[key] = DayReport(subscription, code, moment.date())
        return days[key]

    result = Reconciliation([], unverifiable)
    boundaries: dict[str, tuple[datetime | None, datetime | None] | None] = {}
    for (subscription, code), events in sorted(sent.items()):
        moments = {
            tx: _instant(event.get("timestamp")) or datetime.min.replace(tzinfo=UTC) for tx, event in events.items()
        }
        first, last = min(moments.values()).date(), max(moments.values()).date()
        held: dict[str, list[dict[str, Any]]] = defaultdict(list)
        start = datetime.combine(first, time.min, tzinfo=UTC)
        end = datetime.combine(last, time.max, tzinfo=UTC)
        for event in sink.list_events(subscription, code, start, end):
            held[str(event.get("transaction_id"))].append(event)
        if subscription not in boundaries:
            boundaries[subscription] = sink.subscription_boundaries(subscription)
            if boundaries[subscription] is None:
                result.boundaries_unknown.append(subscription)
        bounds = boundaries[subscription]
        for tx, event in events.items():
            report = day_report(subscription, code, moments[tx])
            report.delivered += 1
            theirs = held.get(tx, [])
            if not theirs:
                report.missing.append(tx)
            elif len(theirs) > 1:
                report.duplicated.append(tx)
            elif not same_properties(theirs[0].get("properties") or {}, event.get("properties") or {}):
                report.differing.append(tx)
            if bounds is not None:
                started, ended = bounds
                if (started is not None and moments[tx] < started) or (ended is not None and moments[tx] > ended):
                    report.not_billable.append(tx)
        counted: Counter[date] = Counter()
        for tx, copies in held.items():
            for copy in copies:
                moment = _instant(copy.get("timestamp")) or EARLIEST
                counted[moment.date()] += 1
                if tx not in events:
                    day_report(subscription, code, moment).unexpected.append(tx)
        for day, count in counted.items():
            days.setdefault((subscription, code, day), DayReport(subscription, code, day)).held += count
    result.days = [days[key] for key in sorted(days)]
    for report in result.days:
        for names in (report.missing, report.unexpected, report.differing, report.duplicated, report.not_billable):
            names.sort()
    return result


@dataclass
class Unbillable:
    """Facts still to be sent (pending or held) whose timestamps fall outside their subscription's boundaries: Lago
    will accept them (200) and never bill them."""

    subscription: str
    before_start: int
    after_end: int
    started_at: datetime | None
    terminated_at: datetime | None

    def describe(self) -> str:
        parts = []
        if self.before_start:
            parts.append(f"{self.before_start} dated before it started ({self.started_at:%Y-%m-%d %H:%M:%S}Z)")
        if self.after_end and self.terminated_at is not None:
            parts.append(f"{self.after_end} dated after it ended ({self.terminated_at:%Y-%m-%d %H:%M:%S}Z)")
        return f"subscription {self.subscription}: {' and '.join(parts)} — Lago accepts them, never bills them"


def unbillable_before_sending(
    sink: LagoSink | None = None,
    *,
    at_most: int = 50,
    tenants_at_most: int = 1000,
    deadline_seconds: float | None = None,
) -> tuple[list[Unbillable], list[str]]:
    """The facts waiting to be sent that Lago will accept but not bill, per subscription, and the subscriptions Lago
    did not describe. Bounded whatever the backlog: at most ``at_most`` subscriptions (one ``GET
    /api/v1/subscriptions/{id}`` each), the not-yet-frozen rows of at most ``tenants_at_most`` tenants, and one
    overall deadline (default: ``SINK_TIMEOUT_SECONDS``) after which, or after the first Lago failure, it stops
    asking: a status command must answer while Lago hangs."""
    from time import monotonic  # (``time`` here is datetime's)

    from .outbox import HELD, PENDING, resolve_subscriptions

    sink = sink or LagoSink()
    using = str(metering_settings.DATABASE_ALIAS)
    timeout = float(deadline_seconds if deadline_seconds is not None else metering_settings.SINK_TIMEOUT_SECONDS)
    deadline = monotonic() + timeout
    waiting = UsageOutbox.objects.using(using).filter(sink=sink.name, state__in=[PENDING, HELD])
    frozen = waiting.exclude(external_subscription_id="")
    by_subscription: dict[str, list[Any]] = {}
    for subscription in frozen.order_by().values_list("external_subscription_id", flat=True).distinct()[:at_most]:
        by_subscription[subscription] = [Q(external_subscription_id=subscription)]
    # Not frozen yet: the subscription the next claim will give them (the nearest ancestor's), grouped in Python.
    unfrozen = waiting.filter(external_subscription_id="")
    paths = list(unfrozen.order_by().values_list("record__tenant__path", flat=True).distinct()[:tenants_at_most])
    per_subscription: dict[str, list[str]] = defaultdict(list)
    for path, subscription in resolve_subscriptions(paths).items():
        if subscription:
            per_subscription[subscription].append(path)
    for subscription, sub_paths in sorted(per_subscription.items()):
        if subscription in by_subscription or len(by_subscription) < at_most:
            by_subscription.setdefault(subscription, []).append(
                Q(external_subscription_id="", record__tenant__path__in=sub_paths)
            )
    found: list[Unbillable] = []
    unknown: list[str] = []
    for subscription, conditions in sorted(by_subscription.items()):
        if monotonic() >= deadline:
            unknown.append(subscription)
            continue
        bounds = sink.subscription_boundaries(subscription)
        if bounds is None:
            unknown.append(subscription)
            deadline = 0.0  # Lago failed or does not know it: ask no more this time
            continue
        condition = conditions[0]
        for more in conditions[1:]:
            condition |= more
        rows = waiting.filter(condition)
        started, ended = bounds
        before = rows.filter(record__timestamp__lt=started).count() if started else 0
        after = rows.filter(record__timestamp__gt=ended).count() if ended else 0
        if before or after:
            found.append(Unbillable(subscription, before, after, started, ended))
    return found, unknown
