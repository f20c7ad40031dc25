"""The operator's dashboard: one admin page (``QuotaLimitAdmin.get_urls``, linked from the admin index).

Four sections, each narrowed to what the request's administrator may see (``tenants.admin_scope``: superusers and
unscoped staff see everything, a scoped tenant administrator its own subtree):

- the quotas nearest their limits (hard ones first, then the fullest), with the usage bars of ``quotas.display``;
- the top consumers per feature in the current hour, day or month, by their *own* usage (their subtree's minus
  their children's subtrees', exact: both come from the same rollups);
- refusals per hour over the last 24 hours (``quotas.refusals``), and who was refused most;
- the outbox per sink: pending, due, held, dead and the age of the oldest pending fact.

Every tenant named links to its admin page. Everything is read in a constant number of queries, whatever the size
of the forest. The page is server-rendered, with no script and nothing loaded from elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Min, Q
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse

from metering.conf import metering_settings
from metering.events import utcnow
from metering.models import UsageOutbox
from metering.usage import usage_by_tenant_and_feature
from tenants.admin_scope import admin_scope, visible_tenants
from tenants.models import Tenant

from .display import QuotaUsage, number, usage_bar, usage_of_quotas
from .models import QuotaLimit
from .refusals import last_hours, refusals_since

NEAREST_SHOWN = 20
CONSUMERS_SHOWN = 5
REFUSED_SHOWN = 10
PERIODS = ("hour", "day", "month")


@dataclass
class NearRow:
    tenant: Tenant
    quota: QuotaLimit
    usage: QuotaUsage
    bar: str
    url: str


@dataclass
class ConsumerRow:
    tenant: Tenant
    used: Decimal
    url: str
    share: Decimal  # of the feature's total own usage among the visible tenants, in percent

    @property
    def used_text(self) -> str:
        return number(self.used)


@dataclass
class HourRow:
    hour: datetime
    count: int
    width: Decimal  # percent of the busiest hour


@dataclass
class RefusedRow:
    tenant: Tenant
    feature: str
    count: int
    url: str


@dataclass
class SinkRow:
    sink: str
    pending: int = 0
    due: int = 0
    held: int = 0
    dead: int = 0
    oldest_pending: datetime | None = None
    age: str = "-"
    url: str = ""


@dataclass
class Dashboard:
    now: datetime
    period: str
    scope: Tenant | None
    nearest: list[NearRow] = field(default_factory=list)
    quotas_considered: int = 0
    consumers: dict[str, list[ConsumerRow]] = field(default_factory=dict)
    hours: list[HourRow] = field(default_factory=list)
    refused_total: int = 0
    refused: list[RefusedRow] = field(default_factory=list)
    sinks: list[SinkRow] = field(default_factory=list)


def build(request: HttpRequest, period: str = "day", now: datetime | None = None, site: str = "admin") -> Dashboard:
    now = now or utcnow()
    scope = admin_scope(request)
    tenants = {tenant.pk: tenant for tenant in visible_tenants(request).only("pk", "external_id", "name", "parent_id")}
    board = Dashboard(now=now, period=period, scope=scope)

    def link(tenant: Tenant) -> str:
        return reverse(f"{site}:xaas_tenants_tenant_change", args=[tenant.pk])

    _nearest(board, tenants, link)
    _consumers(board, tenants, link)
    _refusals(board, tenants, link)
    _outbox(board, scope, site)
    return board


def _nearest(board: Dashboard, tenants: dict[int, Tenant], link: Any) -> None:
    quotas = list(QuotaLimit.objects.filter(tenant_id__in=list(tenants), is_active=True))
    usage = usage_of_quotas(quotas, board.now)
    # Hard quotas first (they refuse), then the fullest; ties by tenant for a stable page.
    quotas.sort(key=lambda quota: (not quota.hard, -usage[quota.pk].percent, tenants[quota.tenant_id].external_id))
    board.quotas_considered = len(quotas)
    board.nearest = [
        NearRow(
            tenant=tenants[quota.tenant_id],
            quota=quota,
            usage=usage[quota.pk],
            bar=usage_bar(usage[quota.pk], compact=True),
            url=link(tenants[quota.tenant_id]),
        )
        for quota in quotas[:NEAREST_SHOWN]
    ]


def _consumers(board: Dashboard, tenants: dict[int, Tenant], link: Any) -> None:
    subtree = usage_by_tenant_and_feature(list(tenants), board.period, board.now)  # type: ignore[arg-type]
    own: dict[str, dict[int, Decimal]] = {}
    for tenant_pk, features in subtree.items():
        for feature, used in features.items():
            own.setdefault(feature, {})[tenant_pk] = own.get(feature, {}).get(tenant_pk, Decimal(0)) + used
            parent = tenants[tenant_pk].parent_id
            if parent in tenants:  # a subtree's usage is also its parent's: take it off the parent's own share
                own[feature][parent] = own[feature].get(parent, Decimal(0)) - used
    for feature in sorted(own):
        ranked = sorted(
            ((pk, used) for pk, used in own[feature].items() if used > 0),
            key=lambda item: (-item[1], tenants[item[0]].external_id),
        )
        total = sum((used for _, used in ranked), Decimal(0))
        board.consumers[feature] = [
            ConsumerRow(tenant=tenants[pk], used=used, url=link(tenants[pk]), share=used * 100 / total)
            for pk, used in ranked[:CONSUMERS_SHOWN]
        ]


def _refusals(board: Dashboard, tenants: dict[int, Tenant], link: Any) -> None:
    hours = last_hours(board.now)
    per_hour = dict.fromkeys(hours, 0)
    per_key: dict[tuple[int, str], int] = {}
    scoped = None if board.scope is None else list(tenants)
    for tenant_pk, feature, hour, count in refusals_since(scoped, hours[0], now=board.now):
        if tenant_pk not in tenants:
            continue
        per_hour[hour] = per_hour.get(hour, 0) + count
        per_key[(tenant_pk, feature)] = per_key.get((tenant_pk, feature), 0) + count
    busiest = max(per_hour.values(), default=0)
    board.hours = [
        HourRow(
            hour=hour, count=per_hour[hour], width=Decimal(per_hour[hour] * 100 / busiest) if busiest else Decimal(0)
        )
        for hour in hours
    ]
    board.refused_total = sum(per_hour.values())
    ranked = sorted(per_key.items(), key=lambda item: (-item[1], tenants[item[0][0]].external_id, item[0][1]))
    board.refused = [
        RefusedRow(tenant=tenants[pk], feature=feature, count=count, url=link(tenants[pk]))
        for (pk, feature), count in ranked[:REFUSED_SHOWN]
    ]


def _outbox(board: Dashboard, scope: Tenant | None, site: str) -> None:
    rows = UsageOutbox.objects.using(metering_settings.DATABASE_ALIAS).filter(
        state__in=[UsageOutbox.State.PENDING, UsageOutbox.State.HELD, UsageOutbox.State.DEAD]
    )
    if scope is not None:
        rows = rows.filter(record__tenant__path__startswith=scope.path)
    pending = Q(state=UsageOutbox.State.PENDING)
    grouped = (
        rows.values("sink")
        .annotate(
            pending=Count("pk", filter=pending),
            due=Count("pk", filter=pending & Q(next_attempt_at__lte=board.now)),
            held=Count("pk", filter=Q(state=UsageOutbox.State.HELD)),
            dead=Count("pk", filter=Q(state=UsageOutbox.State.DEAD)),
            oldest_pending=Min("created_at", filter=pending),
        )
        .order_by("sink")
    )
    changelist = reverse(f"{site}:xaas_metering_usageoutbox_changelist")
    for values in grouped:
        row = SinkRow(url=f"{changelist}?sink={values['sink']}", **values)
        if row.oldest_pending is not None:
            row.age = age(board.now - row.oldest_pending)
        board.sinks.append(row)


def age(elapsed: timedelta) -> str:
    """``3 h 05 min``, ``4 min 10 s``, ``12 s``: how long the oldest pending fact has waited."""
    seconds = max(0, int(elapsed.total_seconds()))
    if seconds >= 86400:
        return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def dashboard_view(model_admin: admin.ModelAdmin, request: HttpRequest) -> HttpResponse:
    """The page (behind ``admin_view``: staff only). Needs the view permission on quotas; 403 without it."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    period = request.GET.get("period", "day")
    if period not in PERIODS:
        period = "day"
    board = build(request, period, site=model_admin.admin_site.name)
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "Operator's dashboard",
        "subtitle": board.scope.external_id if board.scope is not None else None,
        "board": board,
        "periods": PERIODS,
        "opts": model_admin.model._meta,
    }
    return TemplateResponse(request, "xaas_quotas/admin/dashboard.html", context)
