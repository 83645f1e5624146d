"""The poller's status row in the admin, read-only."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from discord_poller.models import PollerStatus


@admin.register(PollerStatus)
class PollerStatusAdmin(admin.ModelAdmin[PollerStatus]):
    list_display = ["updated_at", "started_at"]
    readonly_fields = ["started_at", "updated_at", "report"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: PollerStatus | None = None
    ) -> bool:
        return False
