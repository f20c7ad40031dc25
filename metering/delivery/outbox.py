"""The delivery outbox: one row per fact, written in the fact's own transaction, delivered in claimed batches.

Life of a row: ``pending`` (due at ``next_attempt_at``) -> claimed (``claim_token`` set, ``next_attempt_at`` pushed
one lease ahead, so a worker that dies mid-batch only delays the batch) -> ``delivered``, ``dead`` (the sink rejected
the fact itself), back to ``pending`` later (a transient failure, with backoff) or ``held`` (no Lago subscription on
the tenant's lineage yet). Every mark is conditional on the claim token, so a worker whose lease ran out can never
overwrite the outcome of the worker that took over.

Claims use ``SELECT ... FOR UPDATE SKIP LOCKED`` where the database has it (PostgreSQL): parallel workers take
disjoint batches without waiting on each other. SQLite has no row locks; its ``IMMEDIATE`` transactions serialize
the claims instead.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from django.core.cache import caches
from django.db import connections, transaction
from django.db.models import Case, Count, F, Min, Q, QuerySet, Value, When
from django.db.models.expressions import RawSQL
from django.utils import timezone

from tenants import namespace
from tenants.models import Tenant

from ..conf import metering_settings
from ..models import SinkState, UsageOutbox

logger = logging.getLogger("metering.outbox")

PENDING = UsageOutbox.State.PENDING.value
DELIVERED = UsageOutbox.State.DELIVERED.value
DEAD = UsageOutbox.State.DEAD.value
HELD = UsageOutbox.State.HELD.value
TRIGGER_KEY = "outbox:trigger:v1:"  # in the site's namespace (tenants.namespace)


def _using() -> str:
    return str(metering_settings.DATABASE_ALIAS)


def _rows() -> QuerySet[UsageOutbox]:
    return UsageOutbox.objects.using(_using())


# --- writing (inside the fact's transaction) ----------------------------------------------------------------------


def enqueue(sink: str, record_id: int) -> None:
    """Queue fact ``record_id`` for ``sink``. Call it inside the fact's transaction (the recorder's ``on_stored``)."""
    using = _using()
    UsageOutbox.objects.using(using).create(record_id=record_id, sink=sink, next_attempt_at=timezone.now())
    transaction.on_commit(lambda: trigger_flush(sink), using=using)


def enqueue_many(sink: str, record_ids: Sequence[int]) -> None:
    """``enqueue`` for a batch of facts (the log-mode drainer's): one bulk insert, one trigger after commit."""
    if not record_ids:
        return
    using = _using()
    now = timezone.now()
    rows = [UsageOutbox(record_id=record_id, sink=sink, next_attempt_at=now) for record_id in record_ids]
    UsageOutbox.objects.using(using).bulk_create(rows, batch_size=1000)
    transaction.on_commit(lambda: trigger_flush(sink), using=using)


def trigger_flush(sink: str) -> None:
    """After commit: queue a flush task once ``BATCH_SIZE`` facts are due. Never talks to the sink itself.

    With eager Celery (no broker) nothing is queued: delivery would otherwise run in the request thread. There,
    ``manage.py metering_flush`` (or a worker) delivers. A failure to queue is logged; the beat sweep delivers.
    """
    try:
        from ..tasks import enqueue_flush, flush_outbox

        if flush_outbox.app.conf.task_always_eager:
            return
        cache = caches[metering_settings.CACHE_ALIAS]
        key = namespace.current().cache_key(TRIGGER_KEY + sink)
        if cache.get(key) is not None:
            return  # a flush was queued moments ago and drains everything that is due
        if not due_at_least(sink, int(metering_settings.BATCH_SIZE)):
            return
        if cache.add(key, 1, timeout=max(1, math.ceil(float(metering_settings.TRIGGER_DEBOUNCE_SECONDS)))):
            enqueue_flush(sink)
    except Exception as error:  # broker or cache down: the fact is committed and the sweep will deliver it
        logger.warning(
            "could not queue an outbox flush for %s (%s); the sweep will deliver", sink, type(error).__name__
        )


def due_at_least(sink: str, count: int, now: datetime | None = None) -> bool:
    """Whether at least ``count`` rows of ``sink`` are due (reads at most ``count`` index entries)."""
    due = _rows().filter(sink=sink, state=PENDING, next_attempt_at__lte=now or timezone.now()).order_by()
    return len(due.values_list("id", flat=True)[count - 1 : count]) == 1


# --- claiming and marking (the delivery worker) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimedFact:
    outbox_id: int
    attempts: int
    subscription: str
    tenant_pk: int
    tenant_id: str
    tenant_path: str
    feature: str
    units: int
    timestamp: datetime
    transaction_id: str
    metadata: dict[str, Any]
    body: str = ""
    """The exact JSON of this fact as the sink is sent it, fixed at its first claim (``""`` before)."""
    server_errors: int = 0


@dataclass
class Claim:
    token: str
    facts: list[ClaimedFact]
    held: list[ClaimedFact] = field(default_factory=list)
    """Facts put on hold by this claim: no Lago subscription on their tenant's lineage."""

    @property
    def ids(self) -> list[int]:
        return [fact.outbox_id for fact in self.facts]


CLAIM_FIELDS = (
    "id",
    "attempts",
    "external_subscription_id",
    "record__tenant_id",
    "record__tenant__external_id",
    "record__tenant__path",
    "record__feature",
    "record__units",
    "record__timestamp",
    "record__transaction_id",
    "record__metadata",
    "body",
    "server_errors",
)
GAVE_UP_ERROR = "gave up after"  # a dead letter's error starts so after SINK_MAX_ATTEMPTS transient failures
CONFLICT_ERROR = "conflict:"  # a dead letter's error starts so when the sink holds another event under its key
HELD_ERROR = "no Lago subscription: set lago_subscription_id on the tenant or an ancestor"


def claim(
    sink: str,
    limit: int,
    *,
    now: datetime,
    lease_seconds: float,
    subscriptions: dict[str, str] | None = None,
    freeze: Callable[[ClaimedFact], str] | None = None,
) -> Claim:
    """Lease up to ``limit`` due rows of ``sink`` (oldest first), in one transaction, and return their facts.

    With ``subscriptions`` (a cache of tenant path -> Lago subscription, kept by the caller for one flush), each
    fact without a subscription gets one, stored in the same transaction, before anything is sent: every resend
    then goes to the same subscription. A fact for which none is found is put on hold instead.

    With ``freeze`` (the sink's encoder of one fact), each fact without a ``body`` gets one, stored in the same
    transaction before anything is sent: every resend then sends these exact bytes, whatever the settings say by
    then (a changed ``LAGO_METRICS`` code would otherwise be a second event in Lago's ClickHouse store).
    """
    using = _using()
    token = uuid.uuid4().hex
    with transaction.atomic(using=using):
        due = _rows().filter(sink=sink, state=PENDING, next_attempt_at__lte=now).order_by("next_attempt_at", "id")
        if connections[using].features.has_select_for_update_skip_locked:
            due = due.select_for_update(skip_locked=True, of=("self",))
        facts = [ClaimedFact(*row) for row in due.values_list(*CLAIM_FIELDS)[:limit]]
        if not facts:
            return Claim(token, [])
        held: list[ClaimedFact] = []
        to_freeze: dict[str, list[int]] = defaultdict(list)
        if subscriptions is not None:
            missing = {fact.tenant_path for fact in facts if not fact.subscription} - set(subscriptions)
            if missing:
                subscriptions.update(resolve_subscriptions(missing))
            kept = []
            for fact in facts:
                if fact.subscription:
                    kept.append(fact)
                elif subscriptions[fact.tenant_path]:
                    kept.append(replace(fact, subscription=subscriptions[fact.tenant_path]))
                    to_freeze[kept[-1].subscription].append(fact.outbox_id)
                else:
                    held.append(fact)
            facts = kept
        bodies: dict[int, str] = {}
        if freeze is not None:
            frozen = []
            for fact in facts:
                if not fact.body:
                    fact = replace(fact, body=freeze(fact))
                    bodies[fact.outbox_id] = fact.body
                frozen.append(fact)
            facts = frozen
        lease: dict[str, Any] = {"next_attempt_at": now + timedelta(seconds=lease_seconds), "claim_token": token}
        if bodies:
            _set_bodies(bodies, using)
        if to_freeze:
            lease["external_subscription_id"] = Case(
                *(When(_ids(ids), then=Value(subscription)) for subscription, ids in to_freeze.items()),
                default=F("external_subscription_id"),
            )
        if facts:
            _rows().filter(_ids(fact.outbox_id for fact in facts)).update(**lease)
        if held:
            _rows().filter(_ids(fact.outbox_id for fact in held)).update(
                state=HELD, next_attempt_at=now, last_error=HELD_ERROR
            )
    return Claim(token, facts, held)


BODY_CHUNK = 500  # rows per UPDATE ... FROM (VALUES ...) statement (999 parameters on old SQLite builds)


def _set_bodies(bodies: dict[int, str], using: str) -> None:
    """Store the frozen body of each row in one statement per chunk: ``UPDATE ... FROM (VALUES ...)`` (PostgreSQL,
    SQLite >= 3.33). A ``Case(When(...))`` per row, as ``QuerySet.update`` builds it, cost 60 % of a claim's time."""
    table = connections[using].ops.quote_name(UsageOutbox._meta.db_table)
    items = list(bodies.items())
    with connections[using].cursor() as cursor:
        for start in range(0, len(items), BODY_CHUNK):
            chunk = items[start : start + BODY_CHUNK]
            values = ", ".join(["(%s, %s)"] * len(chunk))
            cursor.execute(
                f"UPDATE {table} SET body = v.column2 FROM (VALUES {values}) AS v WHERE {table}.id = v.column1",  # noqa: S608 - the table name is ours, the values are parameters
                [param for pair in chunk for param in pair],
            )


def resolve_subscriptions(paths: Iterable[str]) -> dict[str, str]:
    """Lago subscription of each tenant path: the tenant's own, else its nearest ancestor's, else ``""``."""
    chains = {path: [int(part) for part in path.strip("/").split("/") if part] for path in set(paths)}
    pks = {pk for chain in chains.values() for pk in chain}
    owned = dict(
        Tenant.objects.using(_using())
        .filter(pk__in=pks)
        .exclude(lago_subscription_id="")
        .values_list("pk", "lago_subscription_id")
    )
    return {path: next((owned[pk] for pk in reversed(chain) if pk in owned), "") for path, chain in chains.items()}


def _relaxed_commit(using: str) -> None:
    """Let PostgreSQL commit this transaction without waiting for the disk. Only for marks that a crash may undo
    safely: a lost mark leaves the row pending, and its resend is answered "already there"."""
    connection = connections[using]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def _ids(ids: Iterable[int]) -> Q:
    """``id IN ids`` as one parameter on PostgreSQL (``IN (SELECT unnest(%s::bigint[]))``): a batch of 10,000 facts
    as 10,000 placeholders cost more Python (Django compiling them, psycopg splitting them) than its SQL."""
    values = [int(value) for value in ids]
    if connections[_using()].vendor == "postgresql":
        return Q(id__in=RawSQL("SELECT unnest(%s::bigint[])", (values,)))
    return Q(id__in=values)


def _claimed(ids: Iterable[int], token: str) -> QuerySet[UsageOutbox]:
    return _rows().filter(_ids(ids), claim_token=token, state=PENDING)


def mark_delivered(ids: list[int], token: str, now: datetime) -> int:
    if not ids:
        return 0
    using = _using()
    with transaction.atomic(using=using):
        _relaxed_commit(using)
        return _claimed(ids, token).update(
            state=DELIVERED, delivered_at=now, attempts=F("attempts") + 1, claim_token=""
        )


def mark_dead(errors: dict[int, str], token: str) -> int:
    """Dead-letter rows the sink rejected, each with the sink's own error."""
    by_error: dict[str, list[int]] = defaultdict(list)
    for outbox_id, error in errors.items():
        by_error[error].append(outbox_id)
    changed = 0
    with transaction.atomic(using=_using()):
        for error, ids in by_error.items():
            changed += _claimed(ids, token).update(
                state=DEAD, last_error=error, attempts=F("attempts") + 1, claim_token=""
            )
    return changed


def mark_retry(
    ids: list[int],
    token: str,
    next_attempt_at: datetime,
    error: str,
    *,
    server_error: bool = False,
    attempted: bool = True,
) -> tuple[int, int]:
    """A transient failure: try again at ``next_attempt_at``. Returns (to retry, dead after SINK_MAX_ATTEMPTS).

    ``server_error``: the sink answered 5xx (counted in ``server_errors``, which splits the fact's next batches).
    ``attempted=False``: the rows were not sent at all (a part of the batch after the failing one): they wait the
    same time, but no attempt is counted, so they can never reach SINK_MAX_ATTEMPTS for another fact's failure.
    """
    if not ids:
        return 0, 0
    max_attempts = metering_settings.SINK_MAX_ATTEMPTS
    dead = 0
    counted: dict[str, Any] = {"attempts": F("attempts") + 1} if attempted else {}
    if server_error:
        counted["server_errors"] = F("server_errors") + 1
    with transaction.atomic(using=_using()):
        if max_attempts is not None and attempted:
            dead = (
                _claimed(ids, token)
                .filter(attempts__gte=int(max_attempts) - 1)
                .update(
                    state=DEAD,
                    last_error=f"{GAVE_UP_ERROR} {max_attempts} attempts: {error}",
                    claim_token="",
                    **counted,
                )
            )
        retry = _claimed(ids, token).update(
            next_attempt_at=next_attempt_at, last_error=error, claim_token="", **counted
        )
    return retry, dead


def release(ids: list[int], token: str, now: datetime) -> int:
    """Give claimed rows back untouched (delivery is blocked): no attempt is counted."""
    if not ids:
        return 0
    return _claimed(ids, token).update(next_attempt_at=now, claim_token="")


# --- operators ----------------------------------------------------------------------------------------------------


def resend(rows: QuerySet[UsageOutbox], now: datetime | None = None) -> int:
    """Put dead and held rows back in the queue, attempts reset. Delivered rows are left alone.

    A dead row keeps the subscription it was first sent with (so a resend can never bill a second subscription)
    and, unless the sink refused it for its content, the exact body it was sent with: a fact that gave up after
    ``SINK_MAX_ATTEMPTS`` or a conflict may be stored already, and only the same body is the same event. A fact the
    sink refused (nothing of it was stored: batches are all-or-nothing) is built again with the current settings,
    which is how a fix is applied to it. A held row gets its subscription and body when it is claimed.
    """
    queued = {"state": PENDING, "attempts": 0, "server_errors": 0, "next_attempt_at": now or timezone.now()}
    refused = rows.filter(state=DEAD).exclude(last_error__startswith=GAVE_UP_ERROR)
    refused = refused.exclude(last_error__startswith=CONFLICT_ERROR)
    with transaction.atomic(using=_using()):
        count = refused.update(body="", claim_token="", **queued)
        count += rows.filter(state__in=(DEAD, HELD)).update(claim_token="", **queued)
    return count


def release_held(sink: str, now: datetime | None = None) -> int:
    """Queue again the held facts of tenants whose lineage has a Lago subscription now."""
    held = _rows().filter(sink=sink, state=HELD)
    paths = dict(held.values_list("record__tenant_id", "record__tenant__path").distinct())
    if not paths:
        return 0
    resolved = resolve_subscriptions(paths.values())
    ready = [tenant_pk for tenant_pk, path in paths.items() if resolved[path]]
    if not ready:
        return 0
    released = held.filter(record__tenant_id__in=ready).update(
        state=PENDING, next_attempt_at=now or timezone.now(), last_error=""
    )
    logger.info("released %d held facts of %s", released, sink)
    return released


def purge_delivered(sink: str, before: datetime, chunk: int = 10_000) -> int:
    """Delete delivered rows delivered before ``before`` (the facts stay), in chunks."""
    deleted = 0
    while True:
        ids = list(
            _rows().filter(sink=sink, state=DELIVERED, delivered_at__lt=before).values_list("id", flat=True)[:chunk]
        )
        if not ids:
            return deleted
        deleted += _rows().filter(id__in=ids).delete()[0]


@dataclass
class SinkStatus:
    sink: str
    counts: dict[str, int]
    due: int
    oldest_pending_at: datetime | None
    held_tenants: list[str]
    dead_samples: list[dict[str, Any]]
    blocked_at: datetime | None
    blocked_status: int | None
    blocked_reason: str
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_error: str
    conflicts: int = 0
    """Dead letters whose transaction_id Lago holds for another event (``CONFLICT_ERROR``)."""

    @property
    def alerts(self) -> list[str]:
        alerts = []
        if self.blocked_at is not None:
            alerts.append(f"delivery blocked ({self.blocked_status}): {self.blocked_reason}")
        if self.counts.get(DEAD):
            alerts.append(f"{self.counts[DEAD]} dead letters")
        if self.conflicts:
            alerts.append(
                f"{self.conflicts} conflicts: Lago holds another event under their transaction_id (not delivered)"
            )
        if self.counts.get(HELD):
            alerts.append(f"{self.counts[HELD]} facts held without a Lago subscription")
        return alerts

    def as_dict(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or timezone.now()
        age = (now - self.oldest_pending_at).total_seconds() if self.oldest_pending_at else None
        return {
            "sink": self.sink,
            "counts": self.counts,
            "due": self.due,
            "oldest_pending_at": _iso(self.oldest_pending_at),
            "oldest_pending_age_seconds": round(age, 3) if age is not None else None,
            "held_tenants": self.held_tenants,
            "dead_samples": self.dead_samples,
            "blocked_at": _iso(self.blocked_at),
            "blocked_status": self.blocked_status,
            "blocked_reason": self.blocked_reason,
            "last_success_at": _iso(self.last_success_at),
            "last_failure_at": _iso(self.last_failure_at),
            "last_error": self.last_error,
            "conflicts": self.conflicts,
            "alerts": self.alerts,
        }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def sinks_in_use() -> list[str]:
    return sorted(
        set(_rows().values_list("sink", flat=True).distinct()) | set(_states().values_list("sink", flat=True))
    )


def _states() -> QuerySet[SinkState]:
    return SinkState.objects.using(_using())


def status(sink: str, *, now: datetime | None = None, samples: int = 10) -> SinkStatus:
    now = now or timezone.now()
    rows = _rows().filter(sink=sink)
    counts = {state: 0 for state in UsageOutbox.State.values}
    counts.update(dict(rows.order_by().values_list("state").annotate(n=Count("id")).values_list("state", "n")))
    pending = rows.filter(state=PENDING)
    oldest = pending.aggregate(oldest=Min("created_at"))["oldest"]
    due = pending.filter(next_attempt_at__lte=now).count()
    held_tenants = list(
        rows.filter(state=HELD)
        .order_by("record__tenant__external_id")
        .values_list("record__tenant__external_id", flat=True)
        .distinct()[:samples]
    )
    dead_samples = [
        {"record_id": record_id, "tenant_id": tenant_id, "transaction_id": tx, "attempts": attempts, "error": error}
        for record_id, tenant_id, tx, attempts, error in rows.filter(state=DEAD)
        .order_by("-id")
        .values_list("record_id", "record__tenant__external_id", "record__transaction_id", "attempts", "last_error")[
            :samples
        ]
    ]
    state = _states().filter(sink=sink).first()
    return SinkStatus(
        sink=sink,
        counts=counts,
        due=due,
        oldest_pending_at=oldest,
        held_tenants=held_tenants,
        dead_samples=dead_samples,
        blocked_at=state.blocked_at if state else None,
        blocked_status=state.blocked_status if state else None,
        blocked_reason=state.blocked_reason if state else "",
        last_success_at=state.last_success_at if state else None,
        last_failure_at=state.last_failure_at if state else None,
        last_error=state.last_error if state else "",
        conflicts=rows.filter(state=DEAD, last_error__startswith=CONFLICT_ERROR).count(),
    )


def backfill(sink: str, *, chunk: int = 10_000, progress: Any = None) -> int:
    """Queue for ``sink`` every fact that has no row for it yet (a sink added later), oldest first, ``chunk`` facts
    per transaction. Safe beside live writers and a second backfill: the (record, sink) constraint keeps one row."""
    from ..models import UsageRecord

    using = _using()
    queued, last = 0, 0
    while True:
        ids = list(
            UsageRecord.objects.using(using)
            .filter(id__gt=last)
            .exclude(outbox_rows__sink=sink)
            .order_by("id")
            .values_list("id", flat=True)[:chunk]
        )
        if not ids:
            return queued
        now = timezone.now()
        with transaction.atomic(using=using):
            created = UsageOutbox.objects.using(using).bulk_create(
                [UsageOutbox(record_id=record_id, sink=sink, next_attempt_at=now) for record_id in ids],
                batch_size=1000,
                ignore_conflicts=True,
            )
        queued += len(created)  # an upper bound beside a concurrent backfill (ignored conflicts are counted too)
        last = ids[-1]
        if progress is not None:
            progress(queued)
