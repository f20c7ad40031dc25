"""The admin's "Sync to Lago" action on the tenant list: ``lago_sync`` for the selected billing tenants.

Two steps, as Django's own delete action: the first shows what would change (``sync(..., dry_run=True)``) for the
plan code typed in, the second applies it. Only for superusers (it creates billing objects in Lago and writes
subscription ids on tenants), and only when the Lago sink is configured.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from tenants.models import Tenant

PLAN_FIELD = "lago_plan_code"
APPLY_FIELD = "lago_apply"


def lago_configured() -> bool:
    from .delivery.sinks import SinkNotConfigured, get_sink
    from .delivery.sinks.lago import LagoSink

    try:
        sink = get_sink("lago")
    except SinkNotConfigured:
        return False
    return isinstance(sink, LagoSink) and not sink.configuration_error()


@admin.action(description="Sync to Lago (customer, subscription, billable metrics)")
def sync_to_lago(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Tenant]) -> HttpResponse | None:
    from .delivery.lago_sync import LagoSyncError, sync

    if not request.user.is_superuser or not lago_configured():
        modeladmin.message_user(request, "Syncing to Lago needs a superuser and the Lago sink.", messages.ERROR)
        return None
    tenants = sorted(queryset, key=lambda tenant: tenant.external_id)
    plan = str(request.POST.get(PLAN_FIELD, "")).strip()
    preview = None
    error = ""
    if plan:
        try:
            if request.POST.get(APPLY_FIELD) == "1":
                report = sync(tenants, plan)
                text = "; ".join(report.changes) or "nothing to change"
                modeladmin.message_user(request, f"Lago: {len(report.changes)} changed: {text}", messages.SUCCESS)
                for warning in report.warnings:
                    modeladmin.message_user(request, f"Lago: {warning}", messages.WARNING)
                return None
            preview = sync(tenants, plan, dry_run=True)
        except LagoSyncError as failure:
            error = f"Lago refused or did not answer: {failure}"
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": "Sync to Lago",
        "opts": modeladmin.model._meta,
        "tenants": tenants,
        "plan": plan,
        "preview": preview,
        "error": error,
        "action_checkbox_name": ACTION_CHECKBOX_NAME,
        "plan_field": PLAN_FIELD,
        "apply_field": APPLY_FIELD,
    }
    return TemplateResponse(request, "xaas_metering/admin/lago_sync.html", context)
