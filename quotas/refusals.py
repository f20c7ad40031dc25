"""Refusals per tenant, feature and UTC hour, for the operator's dashboard (``quotas.dashboard``).

Counted once per refusal, after it was decided and its attempt rolled back (``QuotaPolicyHandler._rejected``): one
upsert in a savepoint of its own, so a store that fails (locked, down, a missing migration) costs the request a log
line and nothing else — the refusal is answered whatever happens here. Inside a caller's transaction the count
commits (or rolls back) with it, like everything else the caller wrote.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db import connections, transaction

from metering.conf import metering_settings
from metering.events import utcnow
from tenants.context import TenantContext

from .exceptions import QuotaExceeded
from .models import QuotaRefusalCount

logger = logging.getLogger("quotas")


def hour_of(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def count_refusal(context: TenantContext, error: QuotaExceeded, at: datetime | None = None) -> None:
    """Add one refusal of ``context``'s tenant for ``error.feature`` in the hour holding ``at``. Never raises."""
    try:
        _increment(context.tenant.pk, error.feature, hour_of(at or utcnow()))
    except Exception:  # counting must never fail the request it describes
        logger.warning("refusal of %s for %s not counted", context.tenant_id, error.feature, exc_info=True)


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


def refusals_since(tenant_pks: list[int] | None, since: datetime) -> list[tuple[int, str, datetime, int]]:
    """(tenant pk, feature, hour, count) from the hour holding ``since`` on, of the given tenants (``None``: all)."""
    rows = QuotaRefusalCount.objects.using(metering_settings.DATABASE_ALIAS).filter(hour__gte=hour_of(since))
    if tenant_pks is not None:
        rows = rows.filter(tenant_id__in=tenant_pks)
    return list(rows.values_list("tenant_id", "feature", "hour", "count").order_by("hour", "tenant_id", "feature"))


def last_hours(now: datetime, hours: int = 24) -> list[datetime]:
    """The starts of the ``hours`` UTC hours ending with the current one, oldest first."""
    current = hour_of(now)
    return [current - timedelta(hours=hours - 1 - index) for index in range(hours)]


KEEP = timedelta(days=7)


def prune(now: datetime | None = None, keep: timedelta = KEEP) -> int:
    """Delete the counts of hours that ended more than ``keep`` ago (the dashboard shows the last 24 hours)."""
    cutoff = hour_of((now or utcnow()) - keep)
    deleted, _ = QuotaRefusalCount.objects.using(metering_settings.DATABASE_ALIAS).filter(hour__lt=cutoff).delete()
    return deleted
