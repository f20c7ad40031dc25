"""Usage in the admin: facts and rollups are read-only (a correction is a new fact, never an edit); the tenant tree
with a usage column and the tenant page with usage charts (``MeteringTenantAdmin``, in place of tenants' admin)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.contrib import admin, messages
from django.db.models import Count
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from tenants.admin import TenantAdmin, replace_tenant_admin
from tenants.admin_scope import TenantScopedAdminMixin, UnscopedOnlyAdminMixin, admin_scope
from tenants.models import Tenant

from .charts import build_chart, daily_usage, number
from .events import utcnow
from .models import (
    FeatureDefinition,
    LogCursor,
    LogDeadEntry,
    LogGap,
    SinkState,
    UsageOutbox,
    UsageRecord,
    UsageRollup,
)
from .usage import usage_by_tenant_and_feature


@dataclass
class LimitItems:
    """What an app above metering shows first in a tenant's usage cell (quotas: its quota bars)."""

    parts: list[SafeString] = field(default_factory=list)
    """Already cut to ``usage_items_per_row``."""
    features: set[str] = field(default_factory=set)
    """Features those parts cover: not repeated as plain usage."""
    count: int = 0
    """How many items there were before the cut (the rest is counted in "and N more")."""


class MeteringTenantAdmin(TenantAdmin):
    """The tree with each row's usage this month, and the tenant page with a usage chart per feature over the last
    ``chart_days`` days. ``quotas.admin.QuotaTenantAdmin`` extends it through ``limit_items`` and ``chart_limits``.
    """

    change_form_template = "xaas_metering/admin/tenant_change_form.html"
    chart_days = 30
    # Bounds that keep every page small whatever a tenant records (issue 10: 5,000 features made a 32 MB page).
    usage_items_per_row = 5  # quota bars, and features without a quota, per row of the tree; then "and N more"
    chart_limit = 10  # usage charts on a tenant's page: the most used features (and limited ones) first

    list_display = ("indented_id", "name", "kind", "usage", "lineage_crumbs", "is_active", "exempt")

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        from .admin_lago import lago_configured, sync_to_lago

        if request.user.is_superuser and lago_configured():  # billing objects in Lago: superusers only
            actions["sync_to_lago"] = (sync_to_lago, "sync_to_lago", sync_to_lago.short_description)  # type: ignore[attr-defined]
        return actions

    def limit_items(self, tenants: list[Tenant], now: Any) -> dict[int, LimitItems]:
        """Per tenant pk, the items shown before its plain usage (none here; a constant number of queries)."""
        return {}

    def chart_limits(self, tenant: Tenant) -> tuple[set[str], dict[str, Decimal]]:
        """Features to chart even without usage, and the daily limit to draw per feature (none here)."""
        return set(), {}

    def annotate_page(self, request: HttpRequest, page: list[Tenant]) -> None:
        super().annotate_page(request, page)
        self._annotate_usage(page)

    def _annotate_usage(self, tenants: list[Tenant]) -> None:
        """The usage cell of every row: ``limit_items`` first, then this month's usage of the other features."""
        if not tenants:
            return
        now = utcnow()
        limits = self.limit_items(tenants, now)
        month = usage_by_tenant_and_feature([tenant.pk for tenant in tenants], "month", now)
        shown = self.usage_items_per_row
        for tenant in tenants:
            own = limits.get(tenant.pk) or LimitItems()
            parts: list[SafeString] = list(own.parts)
            unlimited = sorted(
                ((feature, used) for feature, used in month.get(tenant.pk, {}).items() if feature not in own.features),
                key=lambda item: (-item[1], item[0]),
            )
            for feature, used in sorted(unlimited[:shown]):
                parts.append(
                    format_html('<span class="xaas-usage-plain">{}: {} this month</span>', feature, number(used))
                )
            hidden = max(0, own.count - shown) + max(0, len(unlimited) - shown)
            if hidden:
                parts.append(
                    format_html(
                        '<a class="xaas-usage-more" href="{}">and {} more</a>', self._change_url(tenant.pk), hidden
                    )
                )
            tenant._xaas_usage = (  # type: ignore[attr-defined]
                format_html_join(mark_safe("<br>"), "{}", ((part,) for part in parts)) if parts else "-"
            )

    @admin.display(description="usage (active quotas; this month)")
    def usage(self, tenant: Tenant) -> str:
        return getattr(tenant, "_xaas_usage", "-")

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Tenant | None = None,
    ) -> Any:
        if obj is not None and obj.pk is not None:
            context["xaas_usage_charts"], context["xaas_more_features"] = self._charts(obj)
            context["xaas_chart_days"] = self.chart_days
        return super().render_change_form(request, context, add, change, form_url, obj)

    def _charts(self, tenant: Tenant) -> tuple[list[Any], int]:
        """Charts of the ``chart_limit`` most used features of the last days (limited ones count as used), and how
        many more features there are. A daily limit is drawn as a line. Two queries (and ``chart_limits``')."""
        now = utcnow()
        usage = daily_usage(tenant.pk, self.chart_days, now)
        limited, daily_limits = self.chart_limits(tenant)
        totals = {feature: sum(usage.get(feature, {}).values(), Decimal(0)) for feature in set(usage) | limited}
        ranked = sorted(totals, key=lambda feature: (-totals[feature], feature not in limited, feature))
        chosen = sorted(ranked[: self.chart_limit])
        charts = [
            build_chart(
                feature,
                usage.get(feature, {}),
                days=self.chart_days,
                now=now,
                daily_limit=daily_limits.get(feature),
                index=index,
            )
            for index, feature in enumerate(chosen)
        ]
        return charts, len(ranked) - len(chosen)


replace_tenant_admin(MeteringTenantAdmin)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class TopFeaturesFilter(admin.SimpleListFilter):
    """The feature filter, bounded: the ``limit`` features with the most rows in the (scope-narrowed) list rather
    than every distinct name (a tenant that recorded 5,000 features made every usage page hundreds of KB)."""

    title = "feature (most rows)"
    parameter_name = "feature"
    limit = 20

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        rows = model_admin.get_queryset(request).order_by().values_list("feature").annotate(n=Count("pk"))
        features = [feature for feature, _ in rows.order_by("-n", "feature")[: self.limit]]
        chosen = self.value()
        if chosen and chosen not in features:  # a feature picked from the search or a link stays shown
            features.append(chosen)
        return [(feature, feature) for feature in features]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        return queryset.filter(feature=self.value()) if self.value() else queryset


@admin.register(UsageRecord)
class UsageRecordAdmin(TenantScopedAdminMixin, ReadOnlyAdmin):
    list_display = ("timestamp", "tenant", "feature", "quantity", "transaction_id", "recorded_at")
    list_filter = (TopFeaturesFilter,)
    search_fields = ("tenant__external_id", "transaction_id")
    list_select_related = ("tenant",)
    date_hierarchy = "timestamp"
    ordering = ("-timestamp",)
    show_full_result_count = False  # COUNT(*) over millions of facts on every page view is not worth it


@admin.register(UsageRollup)
class UsageRollupAdmin(TenantScopedAdminMixin, ReadOnlyAdmin):
    list_display = ("bucket", "tenant", "feature", "slot", "quantity", "events")  # an hour is the sum of its slots
    list_filter = (TopFeaturesFilter,)
    search_fields = ("tenant__external_id",)
    list_select_related = ("tenant",)
    ordering = ("-bucket",)
    show_full_result_count = False


class OutboxStateFilter(admin.SimpleListFilter):
    """The state filter, each choice with its count: pending / delivered / dead / held at a glance."""

    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        rows = model_admin.get_queryset(request)  # narrowed to a tenant-scoped administrator's subtree
        counts = dict(rows.order_by().values_list("state").annotate(n=Count("id")))
        return [(value, f"{label} ({counts.get(value, 0)})") for value, label in UsageOutbox.State.choices]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        return queryset.filter(state=self.value()) if self.value() else queryset


@admin.register(UsageOutbox)
class UsageOutboxAdmin(TenantScopedAdminMixin, ReadOnlyAdmin):
    tenant_lookup = "record__tenant"  # a tenant-scoped administrator sees its subtree's facts only
    list_display = (
        "record_id",
        "sink",
        "state",
        "attempts",
        "tenant",
        "feature",
        "next_attempt_at",
        "error",
        "delivered_at",
    )
    list_filter = (OutboxStateFilter, "sink")
    search_fields = ("record__transaction_id", "record__tenant__external_id", "external_subscription_id")
    list_select_related = ("record__tenant",)
    ordering = ("-id",)
    show_full_result_count = False
    actions = ["resend"]

    @admin.display(description="tenant")
    def tenant(self, obj: UsageOutbox) -> str:
        return obj.record.tenant.external_id

    @admin.display(description="feature")
    def feature(self, obj: UsageOutbox) -> str:
        return obj.record.feature

    @admin.display(description="last error")
    def error(self, obj: UsageOutbox) -> str:
        return obj.last_error if len(obj.last_error) <= 120 else obj.last_error[:120] + "..."

    def has_resend_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("xaas_metering.change_usageoutbox"))

    @admin.action(description="Resend the selected dead or held facts", permissions=["resend"])
    def resend(self, request: HttpRequest, queryset: Any) -> None:
        from .delivery.outbox import resend

        count = resend(queryset)
        self.message_user(request, f"{count} facts queued again (delivered ones are left alone).", messages.SUCCESS)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        blocked = SinkState.objects.filter(blocked_at__isnull=False) if admin_scope(request) is None else []
        for state in blocked:
            messages.error(
                request,
                f"Delivery to {state.sink} is STOPPED since {state.blocked_at:%Y-%m-%d %H:%M:%S} UTC "
                f"({state.blocked_reason}). Fix the sink URL or credentials, or resume it under Delivery sinks.",
            )
        return super().changelist_view(request, extra_context)


@admin.register(SinkState)
class SinkStateAdmin(UnscopedOnlyAdminMixin, ReadOnlyAdmin):
    list_display = ("sink", "blocked_at", "blocked_status", "blocked_reason", "last_success_at", "last_failure_at")
    exclude = ("config_fingerprint",)  # a keyed hash of the credentials: nothing an operator needs to read
    actions = ["resume"]

    def has_resume_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("xaas_metering.change_sinkstate"))

    @admin.action(description="Resume delivery (after fixing the sink's URL or credentials)", permissions=["resume"])
    def resume(self, request: HttpRequest, queryset: Any) -> None:
        from .delivery.deliver import resume

        resumed = [state.sink for state in queryset if resume(state.sink)]
        self.message_user(request, f"Resumed: {', '.join(resumed) or 'nothing was blocked'}.", messages.SUCCESS)


# ---- log mode (metering.drain): read-only, for operators; none of it belongs to one tenant's scope ----


@admin.register(LogCursor)
class LogCursorAdmin(UnscopedOnlyAdminMixin, ReadOnlyAdmin):
    list_display = ("root", "generation", "last_entry", "facts", "last_drained_at")
    list_select_related = ("root",)
    search_fields = ("root__external_id",)


@admin.register(LogGap)
class LogGapAdmin(UnscopedOnlyAdminMixin, ReadOnlyAdmin):
    """Redis lost (part of) a tree's log: facts admitted after ``after_entry`` and not persisted may be missing."""

    list_display = ("root", "detected_at", "generation", "after_entry", "last_drained_at")
    list_select_related = ("root",)
    readonly_fields = ("root", "generation", "after_entry", "last_drained_at", "detected_at", "note")
    search_fields = ("root__external_id",)
    date_hierarchy = "detected_at"


@admin.register(LogDeadEntry)
class LogDeadEntryAdmin(UnscopedOnlyAdminMixin, ReadOnlyAdmin):
    """Stream entries that could not become facts, kept with their raw fields."""

    list_display = ("root", "detected_at", "entry_id", "reason")
    list_select_related = ("root",)
    readonly_fields = ("root", "generation", "entry_id", "fields", "reason", "detected_at")
    search_fields = ("root__external_id", "entry_id")


# ---- the feature registry (metering.features): site-wide, so for unscoped administrators only ----


@admin.register(FeatureDefinition)
class FeatureDefinitionAdmin(UnscopedOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("name", "aggregation", "unit", "property_name", "rolls_up", "updated_at")
    list_filter = ("aggregation",)
    search_fields = ("name", "description")
    fields = ("name", "aggregation", "unit", "property_name", "rolls_up", "description")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        # Facts were counted under these: fixed once saved (metering.features).
        return ("name", "aggregation", "property_name", "rolls_up") if obj is not None else ()
