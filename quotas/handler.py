"""``QuotaPolicyHandler``: the brief's entry point. Consume, check, or reserve quota for one tenant context.

Every path — decorator, middleware, DRF permission, reservations, the demo — ends in ``ledger.decide``, which
returns a ``Decision``. A fact is stored by driving metering's write unit (``metering.recorder.FactWrite``): open it
(the fact is written), decide inside it, raise a refusal (everything rolls back) or mark it counted and let it
commit. The retry protocol: ``NeedsExclusive`` (decide again with the tree locked exclusively) and ``StaleLineage``
(the lineage was re-read: again with it), both in ``_attempt``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from types import TracebackType
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.core.cache import caches
from django.db import connections, transaction

from metering import appender, counters, get_meter, log
from metering.adapters.database import DatabaseMeteringAdapter
from metering.breaker import log_level
from metering.conf import metering_settings
from metering.events import (
    UsageEvent,
    ValidEvent,
    quantity_to_units,
    units_to_quantity,
    utcnow,
    validate_event,
    validate_feature_name,
    validate_recorded_feature,
)
from metering.exceptions import LogStoreUnavailable
from metering.recorder import FactWrite, StaleLineage
from tenants import namespace
from tenants.context import TenantContext
from tenants.lineage import get_context
from tenants.locks import lock_name, lock_trees
from tenants.models import Tenant

from . import ledger
from .exceptions import QuotaConfigurationError, QuotaExceeded
from .ledger import Change, Decision, NeedsExclusive
from .models import QuotaReservation
from .refusals import count_refusal
from .rules import QuotaRule, RuleSet, ruleset
from .signals import quota_exceeded, quota_threshold_reached

logger = logging.getLogger("quotas")
T = TypeVar("T")
MAX_ATTEMPTS = 5
DEFAULT_RESERVATION_TTL = timedelta(minutes=10)


class QuotaPolicyHandler:
    """Decides for one ``TenantContext`` (or tenant id) over every level of its lineage."""

    def __init__(self, context: TenantContext | str) -> None:
        # A tenant id is resolved on first use, so the handler can be built in async code.
        self._context = context

    @property
    def context(self) -> TenantContext:
        if not isinstance(self._context, TenantContext):
            self._context = get_context(self._context)
        return self._context

    # ---- consuming: the fact is recorded only if every level has room ----

    def consume(
        self,
        feature: str,
        quantity: Decimal | int | str = 1,
        *,
        metadata: dict[str, Any] | None = None,
        transaction_id: str | None = None,
    ) -> Decision:
        """Record ``quantity`` of ``feature`` if every quota of every level has room; else ``QuotaExceeded``.

        A quantity of 0 only checks (nothing is recorded).
        """
        feature = validate_feature_name(feature)
        units = quantity_to_units(quantity)
        if units == 0:
            return self.check(feature, 0, raise_exception=True)
        if log.is_log_mode():
            return _log_consume(self, feature, quantity, metadata, transaction_id)
        event = UsageEvent(
            self.context.tenant_id,
            feature,
            quantity,
            utcnow(),
            {} if metadata is None else metadata,
            transaction_id=transaction_id,
        )
        write = _meter().fact_write(event, context=self.context)  # validated here: bad input raises now
        mode = _Mode()
        return self._attempt(lambda: self._record(write, mode), mode)

    def check(self, feature: str, quantity: Decimal | int | str = 0, *, raise_exception: bool = False) -> Decision:
        """Would ``quantity`` fit at every level? Consumes nothing (entitlements)."""
        feature = validate_feature_name(feature)
        units = quantity_to_units(quantity)
        if log.is_log_mode():
            return _log_check(self, feature, units, raise_exception)
        change = Change(feature=feature, check_units=units, used_at=utcnow())
        using = metering_settings.DATABASE_ALIAS
        exclusive = counters.recently_unreachable()
        started = time.monotonic()
        try:
            for _ in range(MAX_ATTEMPTS):
                try:
                    with transaction.atomic(using=using):
                        if exclusive:
                            lock_trees([self.context.root.pk], exclusive=True, using=using)
                        epoch = counters.current_epoch(self.context.root.pk, using)
                        decision = self._decide(change, using, exclusive=exclusive, epoch=epoch)
                        transaction.set_rollback(True, using=using)  # a check writes nothing
                except NeedsExclusive:
                    exclusive = True
                    continue
                if not decision.allowed and raise_exception:
                    error = _blocked(decision)
                    self._rejected(error)
                    raise error
                return decision
        finally:
            if counters.unreachable_since(started):
                # A check rolls back, and with it any epoch bump for a Redis command that may still land: bump it
                # durably.
                counters.forget_trees([self.context.root.pk])
        raise RuntimeError("quota counters could not be rebuilt")  # pragma: no cover

    # ---- reservations: for work whose size is known only afterwards ----

    def reserve(
        self, feature: str, estimate: Decimal | int | str, *, ttl: timedelta = DEFAULT_RESERVATION_TTL
    ) -> Reservation:
        """Hold ``estimate`` at every level (or raise ``QuotaExceeded``). Commit the actual amount or release.

        ``ttl``: a ``timedelta`` above 0 and at most ``MAX_RESERVATION_TTL`` (a day), else ``InvalidReservationTtl``.
        """
        from .exceptions import validate_reservation_ttl

        feature = validate_recorded_feature(feature)  # a reservation for a feature never recordable: refused now
        units = quantity_to_units(estimate)
        ttl = validate_reservation_ttl(ttl)
        if log.is_log_mode():
            return _log_reserve(self, feature, units, ttl)
        using = metering_settings.DATABASE_ALIAS
        mode = _Mode()

        def attempt() -> QuotaReservation:
            now = utcnow()
            row = QuotaReservation(
                tenant_id=self.context.tenant.pk,
                feature=feature,
                units=units,
                window_at=now,
                expires_at=now + ttl,
                state=QuotaReservation.State.ACTIVE,
                created_at=now,
            )
            # The locks and the row; the decision (in Redis, or summed on the database); COMMIT.
            counting = counters.DropIfCommitFails(self.context.root.pk)
            with counting, transaction.atomic(using=using):
                row.pk, epoch = self._insert_reservation(row, mode.exclusive, outermost)
                change = Change(feature=feature, check_units=units, reserved_delta=units, reserved_at=now)
                decision = self._decide(change, using, exclusive=mode.exclusive, epoch=epoch)
                if not decision.allowed:
                    raise _blocked(decision)
                counting.counted()
                self._after_commit(decision)
            return row

        # Only in a transaction of its own may a reservation skip waiting for the disk (see ``_insert_reservation``);
        # with AUTOCOMMIT off the transaction is the caller's, whatever ``atomic`` says.
        connection = connections[using]
        outermost = not connection.in_atomic_block and connection.get_autocommit()
        return Reservation(self, self._attempt(attempt, mode))

    # ---- async twins ----

    async def aconsume(self, feature: str, quantity: Decimal | int | str = 1, **kwargs: Any) -> Decision:
        return await sync_to_async(self.consume)(feature, quantity, **kwargs)

    async def acheck(self, feature: str, quantity: Decimal | int | str = 0, **kwargs: Any) -> Decision:
        return await sync_to_async(self.check)(feature, quantity, **kwargs)

    async def areserve(self, feature: str, estimate: Decimal | int | str, **kwargs: Any) -> Reservation:
        # ``reserve`` runs in a worker thread that a cancelled caller does not stop (under ASGI, a client that hangs
        # up cancels the view): a reservation that comes into being after its caller left is released at once,
        # instead of holding quota at every level until it expires.
        pending = asyncio.ensure_future(sync_to_async(self.reserve)(feature, estimate, **kwargs))
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            pending.add_done_callback(_release_abandoned)
            raise

    # ---- internals ----

    def _decide(
        self,
        change: Change,
        using: str,
        *,
        exclusive: bool,
        epoch: int,
        enforce: bool = True,
        used_written: bool = True,
    ) -> Decision:
        """``ledger.decide`` with this lineage's rules as of the tree's ``epoch`` (read under the tree lock)."""
        decide = ledger.decide_exclusively if exclusive else ledger.decide
        rules = self._ruleset(change.feature, epoch)
        return decide(self.context, rules.rules, change, using, enforce=enforce, used_written=used_written, epoch=epoch)

    def _ruleset(self, feature: str, epoch: int) -> RuleSet:
        found = ruleset(self.context, feature, epoch)
        if self.context.exempt:
            # Zero-cap: counted (so thresholds and usage stay right) but never blocking.
            exempted = tuple(
                QuotaRule(r.quota_id, r.level, r.level_path, r.feature, r.period, r.limit_units, False, r.thresholds)
                for r in found.rules
            )
            return RuleSet(exempted, found.epoch, found.loaded_at)
        return found

    def _attempt(self, run: Callable[[], T], mode: _Mode) -> T:
        """``run`` (one transaction) until it neither asks to decide exclusively nor meets a stale lineage."""
        for _ in range(MAX_ATTEMPTS):
            started = time.monotonic()
            try:
                return run()
            except NeedsExclusive:
                # Redis lost counters (or is unreachable): decide again with the tree locked exclusively, rebuilding
                # them on the spot (or deciding on the database).
                mode.exclusive = True
                continue
            except StaleLineage:
                continue  # nothing was written; the lineage has been re-read from the database (``self.context``)
            except Exception as error:
                if counters.unreachable_since(started):
                    # Redis failed in this attempt, and a command it did not answer may still land (a rebuild's SET
                    # among them). The epoch bumped for it rolled back with the attempt: bump it durably.
                    counters.forget_trees([self.context.root.pk])
                if not isinstance(error, QuotaExceeded):
                    raise
                if _expire_due(self.context):
                    continue  # abandoned reservations were holding the room: decide again
                self._rejected(error)
                raise
        raise RuntimeError("quota counters could not be rebuilt")  # pragma: no cover

    def _record(self, write: FactWrite, mode: _Mode, reservation: QuotaReservation | None = None) -> Decision:
        """One attempt at storing ``write``'s fact and deciding on it, in the fact's transaction (metering's unit).

        ``reservation``: the fact commits it (closes it, giving its estimate back, and is never refused)."""
        # The unit re-checks this lineage under the tree lock (and re-reads a stale one before the next attempt).
        self._context = write.context
        valid, using = write.valid, write.using
        # Redis decides from its counters; the database path and a rebuild (exclusive) sum the rollups, so the fact's
        # rollups must be written before the decision.
        rollups_first = ledger.use_redis() is None or mode.exclusive
        names = ledger.lock_names(write.context, valid.feature_name)
        with write.open(exclusive=mode.exclusive, lock_names=names, count=False, rollups_first=rollups_first) as fact:
            if reservation is None:
                change = Change(
                    feature=valid.feature_name, check_units=valid.units, used_delta=valid.units, used_at=valid.timestamp
                )
            else:
                closed = _close_with_fact(reservation, fact.record_id, using)
                change = Change(
                    feature=valid.feature_name,
                    used_delta=valid.units,
                    used_at=valid.timestamp,
                    reserved_delta=-reservation.units if closed else 0,
                    reserved_at=reservation.window_at if closed else None,
                )
            # Committing a reservation never blocks: the work is done and must be recorded.
            decision = self._decide(
                change,
                using,
                exclusive=mode.exclusive,
                enforce=reservation is None,
                used_written=fact.rollups_written,
                epoch=fact.epoch,
            )
            if not decision.allowed:
                raise _blocked(decision)  # the fact rolls back; Redis counted nothing
            fact.counted()
            self._after_commit(decision)
        return decision

    def _insert_reservation(self, row: QuotaReservation, exclusive: bool, outermost: bool) -> tuple[int, int]:
        """Lock the tree (and on the database path the tree's decisions on the feature), insert ``row``; its id and
        the tree's counter epoch (read in the same statement). A stale lineage inserts nothing: it is re-read and
        ``StaleLineage`` raised (retried by ``_attempt``)."""
        context = self.context
        using = metering_settings.DATABASE_ALIAS
        connection = connections[using]
        table = connection.ops.quote_name(QuotaReservation._meta.db_table)
        moment = connection.ops.adapt_datetimefield_value
        tenants = connection.ops.quote_name(Tenant._meta.db_table)
        epoch_sql, epoch_params = counters.epoch_subquery(context.root.pk, using)
        # The WHERE EXISTS re-checks, under the tree lock, the path the lineage was read with (as facts do): a stale
        # lineage (a concurrent move, or a cache that missed its invalidation) inserts nothing.
        insert = (
            f"INSERT INTO {table} (tenant_id, feature, units, window_at, expires_at, state, created_at) "  # noqa: S608
            f"SELECT %s, %s, %s, %s, %s, %s, %s WHERE EXISTS "
            f"(SELECT 1 FROM {tenants} WHERE id = %s AND path = %s AND is_active) RETURNING id, {epoch_sql}"
        )
        params = [
            row.tenant_id,
            row.feature,
            row.units,
            moment(row.window_at),
            moment(row.expires_at),
            row.state,
            moment(row.created_at),
            context.tenant.pk,
            context.path,
            *epoch_params,
        ]
        with connection.cursor() as cursor:
            if outermost and connection.vendor == "postgresql":
                # A reservation is a hold, not a fact, so its transaction need not wait for the disk: a crash may
                # forget the last ones (their units then stay counted in Redis until the counters expire or are
                # rebuilt, an over-count; their commit records the fact all the same). Only when the transaction is
                # ours: inside a caller's, facts may be written too, and they always wait.
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
            lock_trees([context.root.pk], exclusive=exclusive, using=using)
            for name in ledger.lock_names(context, row.feature):
                lock_name(name, using=using)
            cursor.execute(insert, params)
            inserted = cursor.fetchall()
        if not inserted:
            self._context = get_context(context.tenant_id, use_cache=False)
            raise StaleLineage(context.tenant_id)
        return int(inserted[0][0]), int(inserted[0][1])

    def _rejected(self, error: QuotaExceeded) -> None:
        context = self.context
        count_refusal(context, error)  # never raises: a store error is logged
        quota_exceeded.send(sender=QuotaPolicyHandler, context=context, error=error)

    def _after_commit(self, decision: Decision) -> None:
        context = self.context
        transaction.on_commit(
            lambda: _send_thresholds(context, decision), using=metering_settings.DATABASE_ALIAS, robust=True
        )


class _Mode:
    """How the next attempt locks its tree: shared normally, exclusive after Redis lost counters or failed. While
    Redis has just failed in this process, start exclusive: a shared attempt would only fail the same way."""

    def __init__(self) -> None:
        self.exclusive = counters.recently_unreachable()


class Reservation:
    """Quota held for work in progress. Use as a (async) context manager: released unless committed."""

    def __init__(self, handler: QuotaPolicyHandler, row: QuotaReservation) -> None:
        self.handler = handler
        self.row = row
        self.closed = False

    @property
    def estimate(self) -> Decimal:
        return units_to_quantity(self.row.units)

    def commit(
        self,
        actual: Decimal | int | str,
        *,
        metadata: dict[str, Any] | None = None,
        transaction_id: str | None = None,
    ) -> Decision:
        """Record ``actual`` as the fact and give the estimate back to every level (never refused)."""
        if self.closed:
            raise RuntimeError("this reservation is already committed or released")
        handler = self.handler
        event = UsageEvent(
            handler.context.tenant_id,
            self.row.feature,
            actual,
            utcnow(),
            {} if metadata is None else metadata,
            transaction_id,
        )
        if log.is_log_mode():
            decision = _log_commit(self, event)
            self.closed = True
            return decision
        write = _meter().fact_write(event, context=handler.context)
        mode = _Mode()
        decision = handler._attempt(lambda: handler._record(write, mode, reservation=self.row), mode)
        self.closed = True
        return decision

    def release(self) -> None:
        """Give the whole estimate back without recording anything."""
        if self.closed:
            return
        _close(self.handler.context, self.row, QuotaReservation.State.RELEASED)
        self.closed = True

    async def acommit(self, actual: Decimal | int | str, **kwargs: Any) -> Decision:
        return await sync_to_async(self.commit)(actual, **kwargs)

    async def arelease(self) -> None:
        if not self.closed:  # no thread hop for the common case: already committed
            await sync_to_async(self.release)()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.arelease()


_abandoned: set[asyncio.Task[None]] = set()  # releases under way (a task is kept alive only by a reference)


def _release_abandoned(pending: asyncio.Future[Reservation]) -> None:
    if pending.cancelled() or pending.exception() is not None:
        return
    release = asyncio.ensure_future(pending.result().arelease())
    _abandoned.add(release)
    release.add_done_callback(_abandoned.discard)


def _close_with_fact(row: QuotaReservation, record_id: int, using: str) -> bool:
    """Commit the reservation with its fact, in the fact's transaction; only an active one gives its units back."""
    closed = (
        QuotaReservation.objects.using(using)
        .filter(pk=row.pk, tenant_id=row.tenant_id, state=QuotaReservation.State.ACTIVE)
        .update(state=QuotaReservation.State.COMMITTED, record_id=record_id, closed_at=utcnow())
    )
    return bool(closed)


def _blocked(decision: Decision) -> QuotaExceeded:
    """The refusal a decision returned, to raise (inside the transaction: what was written rolls back)."""
    assert decision.blocked is not None, "a refused decision carries its QuotaExceeded"
    return decision.blocked


def _close(context: TenantContext, row: QuotaReservation, state: str) -> bool:
    """Release or expire an active reservation: its units leave every level's reserved counters."""
    using = metering_settings.DATABASE_ALIAS
    # Redis gives the units back before the COMMIT: should the COMMIT fail, the counters are retired.
    counting = counters.DropIfCommitFails(context.root.pk)
    with counting, transaction.atomic(using=using):
        lock_trees([context.root.pk], exclusive=False, using=using)
        closed = (
            QuotaReservation.objects.using(using)
            .filter(pk=row.pk, state=QuotaReservation.State.ACTIVE)
            .update(state=state, closed_at=utcnow())
        )
        if closed:
            change = Change(feature=row.feature, reserved_delta=-row.units, reserved_at=row.window_at)
            epoch = counters.current_epoch(context.root.pk, using)
            ledger.decide(context, [], change, using, enforce=False, epoch=epoch)
            counting.counted()
    return bool(closed)


def _expire_due(context: TenantContext) -> int:
    """Expire the tree's abandoned reservations; returns how many."""
    return expire_reservations(root_path=f"/{context.root.pk}/")


def expire_reservations(root_path: str | None = None, *, now: datetime | None = None) -> int:
    """Release every active reservation past its ``expires_at`` (all trees, or one). Run periodically."""
    due = QuotaReservation.objects.filter(state=QuotaReservation.State.ACTIVE, expires_at__lte=now or utcnow())
    if root_path is not None:
        due = due.filter(tenant__path__startswith=root_path)
    expired = 0
    for row in due.select_related("tenant")[:1000]:
        context = get_context(row.tenant.external_id, require_active=False)
        expired += _close(context, row, QuotaReservation.State.EXPIRED)
    return expired


def _meter() -> DatabaseMeteringAdapter:
    meter = get_meter()
    if not isinstance(meter, DatabaseMeteringAdapter):
        raise QuotaConfigurationError(
            f"quotas need METERING['ADAPTER'] to store facts in this database; {type(meter).__name__} does not"
        )
    return meter


def _send_thresholds(context: TenantContext, decision: Decision) -> None:
    """Send ``quota_threshold_reached`` once per threshold per window (a cache ``add`` is the once-only guard)."""
    cache = caches[metering_settings.CACHE_ALIAS]
    for status in decision.statuses:
        if not status.thresholds or status.limit <= 0:
            continue
        for percent in status.thresholds:
            mark = status.limit * percent / 100
            if not (status.used_before < mark <= status.used):
                continue
            window_id = int(status.window_start.timestamp()) if status.window_start else "all"
            key = namespace.current().cache_key("quota-threshold", status.quota_id, window_id, percent)
            timeout = (
                40 * 24 * 3600
                if status.reset_at is None
                else 24 * 3600 + int((status.reset_at - utcnow()).total_seconds())
            )
            try:
                first = cache.add(key, 1, timeout)
            except Exception as error:  # better twice than never: the signal still goes out
                logger.log(log_level(error), "threshold guard unavailable: %s", type(error).__name__)
                first = True
            if first:
                quota_threshold_reached.send(
                    sender=QuotaPolicyHandler, context=context, status=status, threshold=percent
                )


# ---- log mode (``METERING["WRITE_MODE"] = "log"``, ``metering.appender``): one Redis round trip per admitted fact ----
#
# The entry points above dispatch here first. The lineage and epoch come from the appender's per-process snapshot
# (validated by the script on every call), the rules from ``rules.ruleset`` under that epoch: a warm process sends
# no SQL for an admitted ``consume`` or a ``check``. Reservations stay database rows (their transaction and the
# tree lock shared, as in commit mode), decided and counted by the same script; release and expiry are unchanged.


def _log_tenant_id(handler: QuotaPolicyHandler) -> str:
    current = handler._context
    return current.tenant_id if isinstance(current, TenantContext) else current


def _log_adopt(handler: QuotaPolicyHandler, snap: appender.Snapshot) -> TenantContext:
    """Act with the snapshot's lineage, keeping what the caller may see (``visible_from``, by level)."""
    current = handler._context
    context = snap.context
    if isinstance(current, TenantContext) and current.visible_from:
        visible_pk = current.lineage[current.visible_from].pk
        if any(level.pk == visible_pk for level in context.lineage):
            context = context.seen_from(visible_pk)
        else:  # moved away from the credential's level: show only the tenant's own
            context = replace(context, visible_from=len(context.lineage) - 1)
    handler._context = context
    return context


def _log_decide(
    handler: QuotaPolicyHandler,
    change: Change,
    *,
    enforce: bool = True,
    valid: ValidEvent | None = None,
    reservation: int | None = None,
    snap: appender.Snapshot | None = None,
) -> tuple[Decision, appender.Snapshot]:
    """Decide (and count, and append) until the script answers; refusals send ``quota_exceeded`` as in commit mode
    (after expiring the tree's abandoned reservations, which may have been holding the room)."""
    snap = snap or appender.snapshot(_log_tenant_id(handler))
    for _ in range(appender.MAX_ATTEMPTS):
        context = _log_adopt(handler, snap)
        rules = handler._ruleset(change.feature, snap.epoch).rules
        try:
            result = ledger.decide_logged(snap, rules, change, enforce=enforce, valid=valid, reservation=reservation)
        except QuotaExceeded as error:
            if _expire_due(context):
                continue
            handler._rejected(error)
            raise
        if isinstance(result, Decision):
            return result, snap
        snap = appender.repair(result)
    raise LogStoreUnavailable("the tree's log state kept changing; nothing was written")


def _log_consume(
    handler: QuotaPolicyHandler,
    feature: str,
    quantity: Decimal | int | str,
    metadata: dict[str, Any] | None,
    transaction_id: str | None,
) -> Decision:
    event = UsageEvent(
        _log_tenant_id(handler), feature, quantity, utcnow(), {} if metadata is None else metadata, transaction_id
    )
    valid = validate_event(event)
    snap = appender.snapshot(valid.tenant_id)
    appender.admit_feature(snap, valid.feature_name)
    change = Change(
        feature=valid.feature_name, check_units=valid.units, used_delta=valid.units, used_at=valid.timestamp
    )
    decision, snap = _log_decide(handler, change, valid=valid, snap=snap)
    _send_thresholds(snap.context, decision)
    return decision


def _log_check(handler: QuotaPolicyHandler, feature: str, units: int, raise_exception: bool) -> Decision:
    change = Change(feature=feature, check_units=units, used_at=utcnow())
    try:
        decision, _ = _log_decide(handler, change)
    except QuotaExceeded as error:
        if raise_exception:
            raise
        return Decision(allowed=False, blocked=error)
    return decision


def _log_reserve(handler: QuotaPolicyHandler, feature: str, units: int, ttl: timedelta) -> Reservation:
    """The reservation row in a transaction holding the tree lock shared (a rebuild, exclusive, waits for it), the
    decision and the reserved counters in the script, inside it; should the COMMIT fail, the counters are retired
    (``DropIfCommitFails``)."""
    using = metering_settings.DATABASE_ALIAS
    snap = appender.snapshot(_log_tenant_id(handler))
    for _ in range(appender.MAX_ATTEMPTS):
        context = _log_adopt(handler, snap)
        now = utcnow()
        row = QuotaReservation(
            tenant_id=context.tenant.pk,
            feature=feature,
            units=units,
            window_at=now,
            expires_at=now + ttl,
            state=QuotaReservation.State.ACTIVE,
            created_at=now,
        )
        change = Change(feature=feature, check_units=units, reserved_delta=units, reserved_at=now)
        retry: appender.Outcome | None = None
        try:
            counting = counters.DropIfCommitFails(context.root.pk)
            with counting, transaction.atomic(using=using):
                row.pk, _ = handler._insert_reservation(row, False, outermost=False)
                rules = handler._ruleset(feature, snap.epoch).rules
                result = ledger.decide_logged(snap, rules, change)
                if isinstance(result, Decision):
                    counting.counted()
                    handler._after_commit(result)
                else:
                    retry = result
                    transaction.set_rollback(True, using=using)
        except StaleLineage:
            snap = appender.snapshot(context.tenant_id, fresh=True)
            continue
        except QuotaExceeded as error:
            if _expire_due(context):
                continue
            handler._rejected(error)
            raise
        if retry is None:
            return Reservation(handler, row)
        snap = appender.repair(retry)  # the row rolled back: a rebuild must not count it
    raise LogStoreUnavailable("the tree's log state kept changing; nothing was reserved")


def _log_commit(reservation: Reservation, event: UsageEvent) -> Decision:
    """Close the reservation row and append the fact in one transaction (the tree lock shared): the fact carries the
    reservation's pk (``Entry.reservation``), the estimate leaves the reserved counters in the same script call.
    Never refused. The row's ``record_id`` is set when the drainer inserts the fact (``signals._link_reservations``)."""
    handler = reservation.handler
    row = reservation.row
    valid = validate_event(event)
    using = metering_settings.DATABASE_ALIAS
    snap = appender.snapshot(valid.tenant_id)
    for _ in range(appender.MAX_ATTEMPTS):
        context = _log_adopt(handler, snap)
        retry: appender.Outcome | None = None
        counting = counters.DropIfCommitFails(context.root.pk)
        with counting, transaction.atomic(using=using):
            lock_trees([context.root.pk], exclusive=False, using=using)
            closed = (
                QuotaReservation.objects.using(using)
                .filter(pk=row.pk, state=QuotaReservation.State.ACTIVE)
                .update(state=QuotaReservation.State.COMMITTED, closed_at=utcnow())
            )
            change = Change(
                feature=valid.feature_name,
                used_delta=valid.units,
                used_at=valid.timestamp,
                reserved_delta=-row.units if closed else 0,
                reserved_at=row.window_at if closed else None,
            )
            rules = handler._ruleset(valid.feature_name, snap.epoch).rules
            result = ledger.decide_logged(snap, rules, change, enforce=False, valid=valid, reservation=row.pk)
            if isinstance(result, Decision):
                counting.counted()
                handler._after_commit(result)
            else:
                retry = result
                transaction.set_rollback(True, using=using)
        if retry is None:
            assert isinstance(result, Decision)
            return result
        snap = appender.repair(retry)  # the close rolled back: a rebuild must see the reservation still held
    raise LogStoreUnavailable("the tree's log state kept changing; nothing was written")
