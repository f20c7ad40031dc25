"""Quotas in the admin: list-editable limits with usage bars, actions, reservations (read-only), and the inline of
the tenant page. Every class is narrowed to a tenant-scoped administrator's subtree (``tenants.admin_scope``), where
limits may be set only strictly below the administrator's own tenant."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import InlineModelAdmin
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.safestring import SafeString

from metering.admin import LimitItems, MeteringTenantAdmin, TopFeaturesFilter
from metering.events import utcnow
from tenants.admin import replace_tenant_admin
from tenants.admin_scope import TenantScopedAdminMixin, admin_scope, check_may_set_limits, may_set_limits
from tenants.models import Tenant

from .display import number, period_usage, quota_usage, usage_bar, usage_of_quotas
from .forms import ThresholdsField, read_only
from .models import QuotaLimit, QuotaReservation


class QuotaLimitForm(forms.ModelForm):
    """Compact widgets for the tabular inline and list editing; a limit reads 2000, not 2000.000000."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit = self.initial.get("limit")
        if isinstance(limit, Decimal):
            self.initial["limit"] = f"{limit.normalize():f}"
        if "limit" in self.fields:
            self.fields["limit"].widget.attrs.setdefault("style", "width:8em")
        if "feature" in self.fields:
            self.fields["feature"].widget.attrs.setdefault("style", "width:8em")
        if "warning_thresholds" in self.fields:
            field = self.fields["warning_thresholds"]
            self.fields["warning_thresholds"] = ThresholdsField(label=field.label, disabled=field.disabled)
            self.fields["warning_thresholds"].widget.attrs["style"] = "width:6em"


class ScopedQuotaForm(QuotaLimitForm):
    """Refuses, with a form error, a quota on the scoped administrator's own tenant (its ancestors are not offered)."""

    xaas_scope: Tenant | None = None

    def clean(self) -> dict[str, Any] | None:
        cleaned = super().clean()
        if cleaned is not None and "tenant" in self.fields:
            check_may_set_limits(self.xaas_scope, cleaned.get("tenant"), field="tenant")
        return cleaned


class ScopedQuotaChangelistForm(QuotaLimitForm):
    """A list-editing row of a quota the scoped administrator may not change is drawn disabled (and ignored)."""

    xaas_scope: Tenant | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None and not may_set_limits(self.xaas_scope, self.instance.tenant):
            for field in self.fields.values():
                read_only(field)  # drawn as text, not as an input that looks editable


@admin.register(QuotaLimit)
class QuotaLimitAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    edit_strictly_below = True  # a scoped administrator's own quotas are view-only
    list_display = ("tenant", "feature", "period", "limit", "usage", "enforcement", "is_active", "updated_at")
    list_editable = ("limit", "enforcement", "is_active")
    list_filter = ("period", "enforcement", "is_active", TopFeaturesFilter)
    search_fields = ("tenant__external_id", "tenant__name", "feature")
    autocomplete_fields = ("tenant",)
    list_select_related = ("tenant",)
    actions = ("activate", "deactivate")

    def get_urls(self) -> list[Any]:
        from django.urls import path

        from .dashboard import dashboard_view

        view = self.admin_site.admin_view(lambda request: dashboard_view(self, request))
        return [path("dashboard/", view, name="xaas_quotas_dashboard"), *super().get_urls()]

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        kwargs.setdefault("form", ScopedQuotaForm)
        form = super().get_form(request, obj, change=change, **kwargs)
        return type(form.__name__, (form,), {"xaas_scope": admin_scope(request)})

    def get_changelist_form(self, request: HttpRequest, **kwargs: Any) -> Any:
        kwargs.setdefault("form", ScopedQuotaChangelistForm)
        form = super().get_changelist_form(request, **kwargs)
        return type(form.__name__, (form,), {"xaas_scope": admin_scope(request)})

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        page = list(changelist.result_list)  # evaluated once; the template and the formset use these objects
        usage = usage_of_quotas(page)  # at most one query per period on the page
        for quota in page:
            quota._xaas_usage = usage_bar(usage[quota.pk], compact=True)
        return changelist

    @admin.display(description="used in the current window")
    def usage(self, quota: QuotaLimit) -> SafeString | str:
        return getattr(quota, "_xaas_usage", "-")

    @admin.action(description="Activate the selected quotas")
    def activate(self, request: HttpRequest, queryset: QuerySet[QuotaLimit]) -> None:
        self._set_active(request, queryset, True)

    @admin.action(description="Deactivate the selected quotas")
    def deactivate(self, request: HttpRequest, queryset: QuerySet[QuotaLimit]) -> None:
        self._set_active(request, queryset, False)

    def _set_active(self, request: HttpRequest, queryset: QuerySet[QuotaLimit], active: bool) -> None:
        scope = admin_scope(request)
        selected = list(queryset.select_related("tenant"))
        allowed = [quota for quota in selected if may_set_limits(scope, quota.tenant)]
        # One save per row (not update()) so each rule cache is invalidated on commit.
        for quota in allowed:
            quota.is_active = active
            quota.save(update_fields=["is_active", "updated_at"])
        self.message_user(request, f"{len(allowed)} quota(s) updated.", messages.SUCCESS)
        if scope is not None and len(allowed) < len(selected):
            self.message_user(
                request,
                f"{len(selected) - len(allowed)} quota(s) of {scope.external_id} left unchanged: "
                "limits can be changed only on its descendants.",
                messages.WARNING,
            )


class BoundedQuotaFormSet(BaseInlineFormSet):
    """The first ``max_shown`` quotas (by feature and period): a tenant with thousands of quotas keeps a small page;
    the tenant page links to the quota list for the rest."""

    max_shown = 25

    def get_queryset(self) -> QuerySet[QuotaLimit]:
        if not hasattr(self, "_xaas_bounded"):
            self._xaas_bounded = super().get_queryset().order_by("feature", "period", "pk")[: self.max_shown]
        return self._xaas_bounded


class QuotaLimitInline(admin.TabularInline):
    """The quotas of the tenant page, each with its usage bar. View-only on a scoped administrator's own tenant."""

    model = QuotaLimit
    form = QuotaLimitForm
    formset = BoundedQuotaFormSet
    extra = 0
    fields = ("feature", "period", "limit", "usage", "enforcement", "warning_thresholds", "is_active")
    readonly_fields = ("usage",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Inline instances are made per request: this memo never outlives the page being drawn.
        self._now: datetime = utcnow()
        self._used: dict[tuple[int, str], dict[str, Decimal]] = {}

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = list(super().get_fields(request, obj))
        if not self._may_edit(request, obj):
            shown = {"limit": "limit_value", "warning_thresholds": "thresholds_value"}
            fields = [shown.get(name, name) if isinstance(name, str) else name for name in fields]
        return fields

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return (*super().get_readonly_fields(request, obj), "limit_value", "thresholds_value")

    @admin.display(description="limit")
    def limit_value(self, quota: QuotaLimit) -> str:
        return number(Decimal(quota.limit)) if quota.limit is not None else "-"

    @admin.display(description="warning thresholds")
    def thresholds_value(self, quota: QuotaLimit) -> str:
        return ThresholdsField().prepare_value(quota.warning_thresholds or []) or "-"

    def _may_edit(self, request: HttpRequest, tenant: Tenant | None) -> bool:
        return tenant is None or may_set_limits(admin_scope(request), tenant)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_add_permission(request, obj) and self._may_edit(request, obj)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_change_permission(request, obj) and self._may_edit(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_delete_permission(request, obj) and self._may_edit(request, obj)

    @admin.display(description="used in the current window")
    def usage(self, quota: QuotaLimit) -> SafeString | str:
        if quota.pk is None or quota.period not in QuotaLimit.Period.values:
            return "-"
        key = (quota.tenant_id, quota.period)
        if key not in self._used:  # one query per period shown
            self._used[key] = period_usage(quota.tenant_id, quota.period, self._now)
        return usage_bar(quota_usage(quota, self._used[key].get(quota.feature, Decimal(0))))


class QuotaTenantAdmin(MeteringTenantAdmin):
    """The tree with each row's quota bars (the fullest first) before its other usage, and the tenant page with its
    quotas inline (each with a usage bar) and their features charted, daily limits drawn."""

    change_form_template = "xaas_quotas/admin/tenant_change_form.html"

    def get_inlines(self, request: HttpRequest, obj: Tenant | None) -> list[type[InlineModelAdmin[Any, Any]]]:
        return [*super().get_inlines(request, obj), QuotaLimitInline]

    def limit_items(self, tenants: list[Tenant], now: Any) -> dict[int, LimitItems]:
        """Usage bars of the page's active quotas: two queries for any page (the quotas, their usage)."""
        quotas = list(
            QuotaLimit.objects.filter(tenant_id__in=[tenant.pk for tenant in tenants], is_active=True).order_by(
                "feature", "period"
            )
        )
        usage = usage_of_quotas(quotas, now)
        by_tenant: dict[int, list[QuotaLimit]] = {}
        for quota in quotas:
            by_tenant.setdefault(quota.tenant_id, []).append(quota)
        shown = self.usage_items_per_row
        items: dict[int, LimitItems] = {}
        for tenant_pk, tenant_quotas in by_tenant.items():
            ordered = tenant_quotas
            if len(tenant_quotas) > shown:  # the fullest first: those are the ones an operator looks for
                ordered = sorted(tenant_quotas, key=lambda quota: usage[quota.pk].percent, reverse=True)
            items[tenant_pk] = LimitItems(
                parts=[
                    usage_bar(usage[quota.pk], compact=True, label=f"{quota.feature}/{quota.period} ")
                    for quota in ordered[:shown]
                ],
                features={quota.feature for quota in tenant_quotas},
                count=len(tenant_quotas),
            )
        return items

    def chart_limits(self, tenant: Tenant) -> tuple[set[str], dict[str, Decimal]]:
        limited: set[str] = set()
        daily_limits: dict[str, Decimal] = {}
        for feature, period, limit in QuotaLimit.objects.filter(tenant=tenant, is_active=True).values_list(
            "feature", "period", "limit"
        ):
            limited.add(feature)
            if period == QuotaLimit.Period.DAY:
                daily_limits[feature] = limit
        return limited, daily_limits

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
            more = QuotaLimit.objects.filter(tenant=obj).count() - BoundedQuotaFormSet.max_shown
            if more > 0:
                context["xaas_more_quotas"] = more
                context["xaas_quotas_url"] = (
                    reverse(f"{self.admin_site.name}:xaas_quotas_quotalimit_changelist")
                    + f"?tenant__id__exact={obj.pk}"
                )
        return super().render_change_form(request, context, add, change, form_url, obj)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Tenant], search_term: str
    ) -> tuple[QuerySet[Tenant], bool]:
        queryset, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        scope = admin_scope(request)
        if (
            scope is not None
            and request.GET.get("field_name") == "tenant"
            and request.GET.get("model_name") in ("quotalimit",)
        ):
            # The quota form's autocomplete offers only tenants a scoped administrator may set limits on.
            queryset = queryset.exclude(pk=scope.pk)
        return queryset, may_have_duplicates


replace_tenant_admin(QuotaTenantAdmin)

# The admin index links the operator's dashboard, unless the host project drew its own index.
if admin.site.index_template is None:
    admin.site.index_template = "xaas_quotas/admin/index.html"


@admin.register(QuotaReservation)
class QuotaReservationAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    edit_strictly_below = True
    list_display = ("created_at", "tenant", "feature", "quantity", "state", "expires_at", "closed_at")
    list_filter = ("state", "feature")
    search_fields = ("tenant__external_id",)
    list_select_related = ("tenant",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
