"""The tenant tree in the admin: indented, with lineage breadcrumbs; moves go through Tenant.save (tenants.tree)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html

from .models import Tenant


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("indented_id", "name", "kind", "is_active", "exempt")
    list_filter = ("kind", "exempt", "is_active")
    search_fields = ("external_id", "name")
    ordering = ("path",)
    list_select_related = ("parent",)
    autocomplete_fields = ("parent",)
    readonly_fields = ("lineage", "created_at", "updated_at")
    fields = (
        "external_id",
        "name",
        "kind",
        "parent",
        "is_active",
        "exempt",
        "metadata",
        "lineage",
        "created_at",
        "updated_at",
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Tenant | None = None) -> tuple[str, ...]:
        # A tenant id is stable: it names the tenant in headers, API keys and the billing system.
        readonly = tuple(self.readonly_fields)
        return (*readonly, "external_id") if obj is not None else readonly

    @admin.display(description="tenant id", ordering="path")
    def indented_id(self, tenant: Tenant) -> str:
        return format_html('<span style="padding-left:{}em">{}</span>', tenant.depth * 1.5, tenant.external_id)

    @admin.display(description="lineage")
    def lineage(self, tenant: Tenant) -> str:
        if not tenant.path:
            return "-"
        ancestors = dict(Tenant.objects.filter(pk__in=tenant.ancestor_pks).values_list("pk", "external_id"))
        return " > ".join(ancestors[pk] for pk in tenant.ancestor_pks if pk in ancestors)
