"""Flushing the outbox: claim a batch, send it, mark every fact by what the sink answered, repeat.

Exactly-once in effect rests on two things: a fact leaves ``pending`` only on the sink's word (stored, already
stored, or refused for its own content), and every resend is the same bytes (the body frozen on the outbox row at
the first claim). A batch whose answer was lost is simply sent again; Lago then names the events whose id it already
holds (``value_already_exist``): each is checked against the event Lago holds (``Sink.confirm``) before it counts
as delivered, and the rest is resent. No request carries two events with the same key (``Sink.batch_key``), and a
batch answered 5xx again and again is split (``SINK_BISECT_AFTER``); lost connections never split anything.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from django.dispatch import Signal
from django.utils import timezone

from ..conf import metering_settings
from ..models import SinkState
from . import outbox
from .sinks import Outcome, SendResult, Sink, get_sink
from .sinks.base import Confirmation, backoff

logger = logging.getLogger("metering.delivery")

# Operator alerts. sender: the sink name.
# delivery_blocked(sink, status, reason): the sink refused our credentials or URL; delivery stopped.
delivery_blocked = Signal()
# facts_held(sink, tenant_ids, count): facts without a Lago subscription on their tenant's lineage.
facts_held = Signal()
# facts_dead_lettered(sink, count, errors): the sink refused these facts for their content.
facts_dead_lettered = Signal()

SUCCESS_WRITE_INTERVAL = timedelta(seconds=5)


@dataclass
class FlushReport:
    sink: str | None
    batches: int = 0
    requests: int = 0
    delivered: int = 0
    already_present: int = 0
    dead: int = 0
    held: int = 0
    retrying: int = 0
    retry_in: float | None = None
    blocked: str | None = None
    more: bool = False
    """Stopped at ``max_batches`` with facts still due."""

    @property
    def done(self) -> int:
        return self.delivered + self.dead + self.held

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[FlushReport], None]


def flush(
    sink_name: str | None = None,
    *,
    max_batches: int | None = None,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> FlushReport:
    """Deliver due facts of the configured sink (or ``sink_name``, which must be it) until none is due, a transient
    failure asks to wait, delivery is blocked, or ``max_batches`` were sent. ``now`` pins the clock (tests)."""
    sink = get_sink(sink_name)
    report = FlushReport(sink=sink.name if sink else None)
    if sink is None:
        return report
    clock = (lambda: now) if now is not None else timezone.now
    problem = sink.configuration_error()
    if problem is not None:  # nothing is claimed: the facts wait, untouched, for the configuration
        logger.error("%s: cannot deliver: %s", sink.name, problem)
        report.blocked = problem
        return report
    if _blocked(sink, report):
        return report
    batch_size = sink.batch_size
    lease = float(metering_settings.SINK_LEASE_SECONDS)
    subscriptions: dict[str, str] | None = {} if sink.needs_subscription else None
    while max_batches is None or report.batches < max_batches:
        claimed = outbox.claim(
            sink.name, batch_size, now=clock(), lease_seconds=lease, subscriptions=subscriptions, freeze=sink.freeze
        )
        if not claimed.facts and not claimed.held:
            return report
        report.batches += 1
        _deliver(sink, claimed, clock, report)
        if progress is not None:
            progress(report)
        if report.blocked or report.retry_in is not None:
            return report
    report.more = outbox.due_at_least(sink.name, 1, clock())
    return report


def _deliver(sink: Sink, claimed: outbox.Claim, clock: Callable[[], datetime], report: FlushReport) -> None:
    held = claimed.held
    if held:
        report.held += len(held)
        tenants = sorted({fact.tenant_id for fact in held})
        logger.warning(
            "%s: %d facts held, no Lago subscription on the lineage of %s", sink.name, len(held), ", ".join(tenants)
        )
        facts_held.send(sender=sink.name, sink=sink.name, tenant_ids=tenants, count=len(held))
    facts = claimed.facts
    sink.prepare(facts)
    events = [json.loads(fact.body) if fact.body else sink.build(fact) for fact in facts]
    token = claimed.token
    work = deque(_plan(sink, facts, events))
    while work:
        indexes = work.popleft()
        # Redacted before anything stores or logs it: a collector may echo our credentials back in its answer.
        result = sink.redacted(sink.send([events[i] for i in indexes]))
        report.requests += 1
        ids = [facts[i].outbox_id for i in indexes]
        if result.outcome is Outcome.OK:
            report.delivered += outbox.mark_delivered(ids, token, clock())
            _note_success(sink.name, clock())
        elif result.outcome is Outcome.REJECTED:
            work.extend(_rejected(sink, result, indexes, facts, events, token, clock, report))
        elif result.outcome is Outcome.TRANSIENT:
            untried = [facts[i].outbox_id for pending in work for i in pending]
            server_error = result.status is not None and result.status >= 500
            attempts = max(facts[i].attempts for i in indexes)
            _retry(sink, result, ids, attempts, token, clock(), report, server_error=server_error)
            if untried and server_error and _bisecting(facts):
                # Only this part failed: the rest goes now, so one poison fact cannot hold up healthy ones.
                outbox.release(untried, token, clock())
            elif untried:
                _retry(sink, result, untried, attempts, token, clock(), report, attempted=False)
            return
        else:
            ids += [facts[i].outbox_id for pending in work for i in pending]
            outbox.release(ids, token, clock())
            _block(sink, result, clock(), report)
            return


def _bisecting(facts: list[outbox.ClaimedFact]) -> bool:
    return max((fact.server_errors for fact in facts), default=0) >= int(metering_settings.SINK_BISECT_AFTER)


def _plan(sink: Sink, facts: list[outbox.ClaimedFact], events: list[dict[str, Any]]) -> list[list[int]]:
    """The requests for one claim, as lists of indexes, in order.

    No request carries two events with the same sink key (Lago's ``transaction_id``): since lago-api v1.39 the
    PostgreSQL store checks it across the whole batch whatever the subscription, refuses the second and rolls back
    the batch, so two facts that share a key (two tenants, unqualified ids) go in separate requests.

    Facts whose batches were answered 5xx ``SINK_BISECT_AFTER`` times or more are sent in smaller parts, halved at
    each further 5xx: a fact that makes Lago fail alone ends up alone, and the healthy ones get through. Only a 5xx
    *answer* counts: a timeout, a dropped connection or a lost answer says nothing about the facts.
    """
    waves: list[list[int]] = []
    seen: dict[str, int] = {}
    for index, event in enumerate(events):
        key = sink.batch_key(event)
        number = seen.get(key, -1) + 1 if key is not None else 0
        if key is not None:
            seen[key] = number
        if number == len(waves):
            waves.append([])
        waves[number].append(index)
    excess = max((fact.server_errors for fact in facts), default=0) - int(metering_settings.SINK_BISECT_AFTER)
    plan: list[list[int]] = []
    for wave in waves:
        size = len(wave) if excess < 0 else max(1, len(wave) >> min(excess + 1, 30))
        plan.extend(wave[start : start + size] for start in range(0, len(wave), size))
    return plan


def _rejected(
    sink: Sink,
    result: SendResult,
    indexes: list[int],
    facts: list[outbox.ClaimedFact],
    events: list[dict[str, Any]],
    token: str,
    clock: Callable[[], datetime],
    report: FlushReport,
) -> list[list[int]]:
    """Mark what the rejection names; return the parts still to send."""
    if result.duplicates or result.invalid:
        present: list[int] = []
        unconfirmed: list[int] = []
        unconfirmed_reason = ""
        dead = {facts[indexes[j]].outbox_id: error for j, error in result.invalid.items()}
        for j in sorted(result.duplicates):
            fact = facts[indexes[j]]
            # "Already exists" names the key, not the event: check that the sink holds *this* fact under it.
            check = sink.confirm(events[indexes[j]])
            if check.outcome is Confirmation.HELD:
                present.append(fact.outbox_id)
            elif check.outcome is Confirmation.CONFLICT:
                dead[fact.outbox_id] = f"{outbox.CONFLICT_ERROR} {check.reason}"
            else:
                unconfirmed.append(fact.outbox_id)
                unconfirmed_reason = check.reason
        present_count = outbox.mark_delivered(present, token, clock())
        report.delivered += present_count
        report.already_present += present_count
        _dead_letter(sink, dead, token, report)
        if unconfirmed:  # neither proven held nor refused: try again later, as after a lost answer
            attempts = max(facts[i].attempts for i in indexes)
            error = SendResult(Outcome.TRANSIENT, error=f"already exists, unconfirmed: {unconfirmed_reason}"[:500])
            _retry(sink, error, unconfirmed, attempts, token, clock(), report, final=False)
        rest = [index for j, index in enumerate(indexes) if j not in result.duplicates and j not in result.invalid]
        return [rest] if rest else []
    if len(indexes) == 1:
        _dead_letter(sink, {facts[indexes[0]].outbox_id: result.error}, token, report)
        return []
    # Refused as a whole without naming anyone: halve until the culprits stand alone.
    middle = len(indexes) // 2
    return [indexes[:middle], indexes[middle:]]


def _dead_letter(sink: Sink, errors: dict[int, str], token: str, report: FlushReport) -> None:
    if not errors:
        return
    count = outbox.mark_dead(errors, token)
    report.dead += count
    if count:
        sample = next(iter(errors.values()))
        logger.error("%s: %d facts dead-lettered, e.g. %s", sink.name, count, sample)
        facts_dead_lettered.send(sender=sink.name, sink=sink.name, count=count, errors=sorted(set(errors.values())))


def _retry(
    sink: Sink,
    result: SendResult,
    ids: list[int],
    attempts: int,
    token: str,
    now: datetime,
    report: FlushReport,
    *,
    server_error: bool = False,
    attempted: bool = True,
    final: bool = True,
) -> None:
    """Retry ``ids`` after a backoff. ``final``: this ends the flush (the worker waits ``retry_in``)."""
    delay = backoff(attempts + 1, result.retry_after)
    retrying, dead = outbox.mark_retry(
        ids, token, now + timedelta(seconds=delay), result.error, server_error=server_error, attempted=attempted
    )
    report.retrying += retrying
    report.dead += dead
    if final:
        report.retry_in = delay if report.retry_in is None else max(report.retry_in, delay)
    logger.warning(
        "%s: delivery failed (%s); %d facts retried in %.1fs%s",
        sink.name,
        result.error,
        retrying,
        delay,
        f", {dead} dead after SINK_MAX_ATTEMPTS" if dead else "",
    )
    SinkState.objects.using(_using()).update_or_create(
        sink=sink.name, defaults={"last_failure_at": now, "last_error": result.error[:2000]}
    )


def _block(sink: Sink, result: SendResult, now: datetime, report: FlushReport) -> None:
    reason = result.error[:2000]
    report.blocked = reason
    state, _ = SinkState.objects.using(_using()).get_or_create(sink=sink.name)
    first = state.blocked_at is None
    state.blocked_at = state.blocked_at or now
    state.blocked_status = result.status
    state.blocked_reason = reason
    state.config_fingerprint = sink.fingerprint()
    state.last_failure_at = now
    state.last_error = reason
    state.save()
    if first:
        logger.error(
            "%s: delivery STOPPED, %s refused us (%s). Fix METERING's SINK_URL/credentials (delivery resumes by "
            "itself once they change) or resume it with `manage.py metering_flush --resume`.",
            sink.name,
            sink.safe_url(),
            reason,
        )
        delivery_blocked.send(sender=sink.name, sink=sink.name, status=result.status, reason=reason)


def _blocked(sink: Sink, report: FlushReport) -> bool:
    """Whether delivery is stopped. A changed URL or credential lifts the block by itself."""
    state = SinkState.objects.using(_using()).filter(sink=sink.name, blocked_at__isnull=False).first()
    if state is None:
        return False
    if state.config_fingerprint != sink.fingerprint():
        logger.warning("%s: the sink configuration changed since delivery was blocked; trying again", sink.name)
        resume(sink.name)
        return False
    report.blocked = state.blocked_reason
    return True


def resume(sink_name: str) -> bool:
    """Lift a block (after fixing the sink's side). Returns whether it was blocked."""
    return bool(
        SinkState.objects.using(_using())
        .filter(sink=sink_name, blocked_at__isnull=False)
        .update(blocked_at=None, blocked_status=None, blocked_reason="", config_fingerprint="")
    )


_success_noted: dict[str, datetime] = {}


def _note_success(sink_name: str, now: datetime) -> None:
    # At most one write per interval and process: a hot row written by every batch would serialize the workers.
    last = _success_noted.get(sink_name)
    if last is not None and abs(now - last) < SUCCESS_WRITE_INTERVAL:
        return
    _success_noted[sink_name] = now
    SinkState.objects.using(_using()).update_or_create(sink=sink_name, defaults={"last_success_at": now})


def _using() -> str:
    return str(metering_settings.DATABASE_ALIAS)
