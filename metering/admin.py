"""Usage in the admin: facts and rollups are read-only (a correction is a new fact, never an edit)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import UsageRecord, UsageRollup


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = ("timestamp", "tenant", "feature", "quantity", "transaction_id", "recorded_at")
    list_filter = ("feature",)
    search_fields = ("tenant__external_id", "transaction_id")
    list_select_related = ("tenant",)
    date_hierarchy = "timestamp"
    ordering = ("-timestamp",)
    show_full_result_count = False  # COUNT(*) over millions of facts on every page view is not worth it


@admin.register(UsageRollup)
class UsageRollupAdmin(ReadOnlyAdmin):
    list_display = ("bucket", "tenant", "feature", "quantity", "events")
    list_filter = ("feature",)
    search_fields = ("tenant__external_id",)
    list_select_related = ("tenant",)
    ordering = ("-bucket",)
    show_full_result_count = False
