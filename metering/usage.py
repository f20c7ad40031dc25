"""Reading usage: a tenant's usage is the sum over its whole subtree.

A window that is exactly an hour, day, month or everything is served from the Redis counter when there is one;
otherwise whole hours come from the rollups (per hour of one tenant the sum of its slot rows, one row once folded)
and only the partial hours at the edges of an arbitrary range read raw facts. Raw facts are never scanned for whole
hours.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import OperationalError
from django.db.models import Sum

from tenants.context import TenantContext
from tenants.lineage import get_context

from . import counters, rollups
from .conf import metering_settings
from .events import units_to_quantity, utc_moment, validate_feature_name
from .exceptions import InvalidPeriod
from .models import UsageRollup
from .windows import Period, ceil_hour, floor_hour, matching_period, window


def _validate_range(start: datetime | None, end: datetime | None) -> tuple[datetime | None, datetime | None]:
    """The range in plain UTC datetimes: each end ``None`` or an aware datetime from 1970-01-01 to 9999-01-01 UTC
    (so that no window computation overflows), ``end`` not before ``start``. Raises ``InvalidPeriod`` naming
    ``start_time`` or ``end_time``. UTC, because an offset such as -21:56:00.9 is a valid Python ``timezone`` that
    PostgreSQL refuses ("time zone displacement out of range")."""
    first = None if start is None else utc_moment(start, "start_time", InvalidPeriod)
    last = None if end is None else utc_moment(end, "end_time", InvalidPeriod)
    if first is not None and last is not None and last < first:
        raise InvalidPeriod("end_time is before start_time", field="end_time")
    return first, last


def get_usage_units(
    tenant_id: str | TenantContext, feature_name: str, start_time: datetime | None, end_time: datetime | None
) -> int:
    """Exact units used by the tenant's subtree in ``[start_time, end_time)``; ``None`` leaves an end open."""
    feature = validate_feature_name(feature_name)
    start_time, end_time = _validate_range(start_time, end_time)
    context = tenant_id if isinstance(tenant_id, TenantContext) else get_context(tenant_id, require_active=False)
    period = matching_period(start_time, end_time)
    if period is not None:
        cached = counters.read(context.root.pk, context.tenant.pk, feature, period, start_time, end_time)
        if cached is not None:
            return cached
    return _units_from_database(context, feature, start_time, end_time)


def get_usage(
    tenant_id: str | TenantContext, feature_name: str, start_time: datetime | None, end_time: datetime | None
) -> Decimal:
    return units_to_quantity(get_usage_units(tenant_id, feature_name, start_time, end_time))


def get_period_usage(tenant_id: str | TenantContext, feature_name: str, period: Period, at: datetime) -> Decimal:
    start, end = window(period, at)
    return get_usage(tenant_id, feature_name, start, end)


def _units_from_database(context: TenantContext, feature: str, start: datetime | None, end: datetime | None) -> int:
    using = metering_settings.DATABASE_ALIAS
    pk = context.tenant.pk
    first_whole = ceil_hour(start) if start is not None else None
    last_whole = floor_hour(end) if end is not None else None
    if first_whole is not None and last_whole is not None and first_whole > last_whole:
        # Start and end fall inside one hour.
        assert start is not None and end is not None
        return rollups.sum_units_from_facts(context.path, feature, start, end, using=using)
    units = rollups.sum_units(pk, feature, first_whole, last_whole, using=using)
    if start is not None and first_whole is not None and start < first_whole:
        units += rollups.sum_units_from_facts(context.path, feature, start, first_whole, using=using)
    if end is not None and last_whole is not None and last_whole < end:
        units += rollups.sum_units_from_facts(context.path, feature, last_whole, end, using=using)
    return units


def usage_by_feature(tenant: TenantContext | str, period: Period, at: datetime) -> dict[str, Decimal]:
    """Every feature's usage of the tenant's subtree in the ``period`` window holding ``at``."""
    context = tenant if isinstance(tenant, TenantContext) else get_context(tenant, require_active=False)
    return usage_by_tenant_and_feature([context.tenant.pk], period, at).get(context.tenant.pk, {})


def usage_by_tenant_and_feature(tenant_pks: list[int], period: Period, at: datetime) -> dict[int, dict[str, Decimal]]:
    """Subtree usage per tenant and feature in one query over the rollups (for listings such as ``usage --tree``)."""
    start, end = window(period, at)
    rows = UsageRollup.objects.using(metering_settings.DATABASE_ALIAS).filter(tenant_id__in=tenant_pks)
    if start is not None and end is not None:
        rows = rows.filter(bucket__gte=start, bucket__lt=end)
    grouped = rows.values_list("tenant_id", "feature").annotate(units=Sum("units")).order_by("tenant_id", "feature")
    try:
        sums = [(tenant_pk, feature, int(units or 0)) for tenant_pk, feature, units in grouped]
    except OperationalError as error:  # SQLite: a sum past 64 bits; add the rows up in Python, exactly
        if "integer overflow" not in str(error):
            raise
        totals: dict[tuple[int, str], int] = {}
        for tenant_pk, feature, units in rows.values_list("tenant_id", "feature", "units").iterator():
            totals[(tenant_pk, feature)] = totals.get((tenant_pk, feature), 0) + int(units)
        sums = [(tenant_pk, feature, units) for (tenant_pk, feature), units in sorted(totals.items())]
    result: dict[int, dict[str, Decimal]] = {}
    for tenant_pk, feature, units in sums:
        result.setdefault(tenant_pk, {})[feature] = units_to_quantity(units)
    return result
