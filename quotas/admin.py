"""Quotas in the admin: list-editable limits, and reservations (read-only) for operators to watch."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import QuotaLimit, QuotaReservation


@admin.register(QuotaLimit)
class QuotaLimitAdmin(admin.ModelAdmin):
    list_display = ("tenant", "feature", "limit", "period", "enforcement", "is_active", "updated_at")
    list_editable = ("limit", "enforcement", "is_active")
    list_filter = ("period", "enforcement", "is_active", "feature")
    search_fields = ("tenant__external_id", "tenant__name", "feature")
    autocomplete_fields = ("tenant",)
    list_select_related = ("tenant",)
    actions = ("activate", "deactivate")

    @admin.action(description="Activate the selected quotas")
    def activate(self, request: HttpRequest, queryset: QuerySet[QuotaLimit]) -> None:
        self._set_active(request, queryset, True)

    @admin.action(description="Deactivate the selected quotas")
    def deactivate(self, request: HttpRequest, queryset: QuerySet[QuotaLimit]) -> None:
        self._set_active(request, queryset, False)

    def _set_active(self, request: HttpRequest, queryset: QuerySet[QuotaLimit], active: bool) -> None:
        # One save per row (not update()) so each rule cache is invalidated on commit.
        for quota in queryset:
            quota.is_active = active
            quota.save(update_fields=["is_active", "updated_at"])
        self.message_user(request, f"{queryset.count()} quota(s) updated.", messages.SUCCESS)


@admin.register(QuotaReservation)
class QuotaReservationAdmin(admin.ModelAdmin):
    list_display = ("created_at", "tenant", "feature", "quantity", "state", "expires_at", "closed_at")
    list_filter = ("state", "feature")
    search_fields = ("tenant__external_id",)
    list_select_related = ("tenant",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
