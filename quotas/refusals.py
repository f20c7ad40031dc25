"""Refusals per tenant, feature and UTC hour, for the operator's dashboard (``quotas.dashboard``).

Counted once per refusal, after it was decided and its attempt rolled back (``QuotaPolicyHandler._rejected``).

- With the metering cache on Redis: one ``HINCRBY`` on the hour's hash (kept ``KEEP`` plus an hour), no SQL — a flood
  of refused requests (an abusive client retrying its 429s) costs Redis one increment each and never queues on a
  database row. A Redis error falls back to the database (a lost answer after the increment may count that one
  refusal twice: a dashboard figure, never money).
- Otherwise: one upsert in a savepoint of its own, so a store that fails (locked, down, a missing migration) costs
  the request a log line and nothing else — the refusal is answered whatever happens here. Inside a caller's
  transaction the count commits (or rolls back) with it, like everything else the caller wrote.

``refusals_since`` reads both.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.db import connections, transaction

from metering import counters
from metering.conf import metering_settings
from metering.events import utcnow
from tenants import namespace
from tenants.context import TenantContext

from .exceptions import QuotaExceeded
from .models import QuotaRefusalCount

logger = logging.getLogger("quotas")


KEEP = timedelta(days=7)
REDIS_SECONDS = int(KEEP.total_seconds()) + 3600  # a Redis hour outlives the database's pruning of the same hour


def hour_of(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def count_refusal(context: TenantContext, error: QuotaExceeded, at: datetime | None = None) -> None:
    """Add one refusal of ``context``'s tenant for ``error.feature`` in the hour holding ``at``. Never raises."""
    hour = hour_of(at or utcnow())
    try:
        if _count_in_redis(context.tenant.pk, error.feature, hour):
            return
        _increment(context.tenant.pk, error.feature, hour)
    except Exception:  # counting must never fail the request it describes
        logger.warning("refusal of %s for %s not counted", context.tenant_id, error.feature, exc_info=True)


def _redis_key(hour: datetime) -> str:
    # In the site's namespace (two sites on one Redis never mix their counts) but outside the counter keys
    # (``counter_prefix``: every one of those belongs to one tree's hash tag, which the audits and Redis Cluster
    # slotting rely on). One key per hour: a single-key command, fine on Redis Cluster.
    return namespace.current().cache_key("refusals", f"{hour:%Y%m%d%H}")


def _redis() -> Any | None:
    redis = counters.client()
    return None if redis is None or counters.recently_unreachable() else redis


def _count_in_redis(tenant_pk: int, feature: str, hour: datetime) -> bool:
    """True when Redis counted it (one round trip); False: no Redis, or it failed (the database counts it then)."""
    redis = _redis()
    if redis is None:
        return False
    key = _redis_key(hour)
    try:
        pipe = redis.pipeline(transaction=False)
        pipe.hincrby(key, f"{tenant_pk}:{feature}", 1)
        pipe.expire(key, REDIS_SECONDS)
        pipe.execute()
    except counters.RedisError:
        counters.note_unreachable()
        return False
    return True


def _increment(tenant_pk: int, feature: str, hour: datetime) -> None:
    using = metering_settings.DATABASE_ALIAS
    table = QuotaRefusalCount._meta.db_table
    connection = connections[using]
    quote = connection.ops.quote_name
    hour_value = connection.ops.adapt_datetimefield_value(hour)
    # One statement, exact under concurrency on PostgreSQL and SQLite (ON CONFLICT ... DO UPDATE increments the row
    # whoever inserted it first).
    sql = (
        f"INSERT INTO {quote(table)} (tenant_id, feature, hour, count) VALUES (%s, %s, %s, 1) "  # noqa: S608 (our table)
        f"ON CONFLICT (tenant_id, feature, hour) DO UPDATE SET count = {quote(table)}.count + 1"
    )
    own_transaction = not connection.in_atomic_block
    with transaction.atomic(using=using), connection.cursor() as cursor:
        if own_transaction and connection.vendor == "postgresql":
            # The count's own transaction does not wait for its WAL flush (the refusal it counts is already decided;
            # a crash may lose the last fraction of a second of counts, never corrupt them). Never set inside a
            # caller's transaction: SET LOCAL would apply to everything the caller commits.
            cursor.execute("SET LOCAL synchronous_commit TO OFF")
        cursor.execute(sql, [tenant_pk, feature, hour_value])


def refusals_since(
    tenant_pks: list[int] | None, since: datetime, now: datetime | None = None
) -> list[tuple[int, str, datetime, int]]:
    """(tenant pk, feature, hour, count) from the hour holding ``since`` on, of the given tenants (``None``: all):
    the database's counts and Redis's (one pipelined round trip for all hours), summed."""
    rows = QuotaRefusalCount.objects.using(metering_settings.DATABASE_ALIAS).filter(hour__gte=hour_of(since))
    if tenant_pks is not None:
        rows = rows.filter(tenant_id__in=tenant_pks)
    totals: dict[tuple[int, str, datetime], int] = {}
    for tenant_pk, feature, hour, count in rows.values_list("tenant_id", "feature", "hour", "count"):
        totals[(tenant_pk, feature, hour)] = totals.get((tenant_pk, feature, hour), 0) + count
    redis = _redis()
    if redis is not None:
        first, last = hour_of(since), hour_of(now or utcnow())
        hours = [first + timedelta(hours=step) for step in range(int((last - first).total_seconds() // 3600) + 1)]
        wanted = None if tenant_pks is None else set(tenant_pks)
        try:
            pipe = redis.pipeline(transaction=False)
            for hour in hours:
                pipe.hgetall(_redis_key(hour))
            answers = pipe.execute()
        except counters.RedisError:
            counters.note_unreachable()
            answers = []
        for hour, mapping in zip(hours, answers, strict=False):
            for field_name, value in (mapping or {}).items():
                pk_text, _, feature = (field_name.decode() if isinstance(field_name, bytes) else field_name).partition(
                    ":"
                )
                tenant_pk = int(pk_text)
                if wanted is None or tenant_pk in wanted:
                    totals[(tenant_pk, feature, hour)] = totals.get((tenant_pk, feature, hour), 0) + int(value)
    return sorted(
        ((pk, feature, hour, count) for (pk, feature, hour), count in totals.items()),
        key=lambda row: (row[2], row[0], row[1]),
    )


def last_hours(now: datetime, hours: int = 24) -> list[datetime]:
    """The starts of the ``hours`` UTC hours ending with the current one, oldest first."""
    current = hour_of(now)
    return [current - timedelta(hours=hours - 1 - index) for index in range(hours)]


def prune(now: datetime | None = None, keep: timedelta = KEEP) -> int:
    """Delete the counts of hours that ended more than ``keep`` ago (the dashboard shows the last 24 hours)."""
    cutoff = hour_of((now or utcnow()) - keep)
    deleted, _ = QuotaRefusalCount.objects.using(metering_settings.DATABASE_ALIAS).filter(hour__lt=cutoff).delete()
    return deleted
