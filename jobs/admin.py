"""The Django admin for inspecting jobs."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.timesince import timesince

from jobs.models import Job


@admin.register(Job)
class JobAdmin(admin.ModelAdmin[Job]):
    list_display = [
        "id",
        "job_id",
        "place_id",
        "channel",
        "source",
        "shown_status",
        "age",
        "claimed_by",
    ]
    list_filter = ["status", "source", "channel"]
    search_fields = ["=job_id", "=message_id"]
    date_hierarchy = "created_at"
    list_per_page = 100
    show_full_result_count = False  # a COUNT(*) per page view on a big table
    actions = ["requeue", "expire"]
    readonly_fields = [
        "id",
        "job_id",
        "place_id",
        "channel",
        "source",
        "message_id",
        "title",
        "readable_fields",
        "created_at",
        "expires_at",
        "status",
        "claimed_at",
        "claimed_by",
        "lease",
        "lease_expires_at",
    ]
    exclude = ["fields"]

    class Media:
        # The list's column widths: it must fit 1,280 px (docs/dashboard.md).
        css = {"all": ["jobs/admin.css"]}

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # The list needs the width more than the app list beside it, which
        # repeats the breadcrumbs here: without it, nine columns and the
        # filters fit 1,280 px.
        context = {"is_nav_sidebar_enabled": False, **(extra_context or {})}
        return super().changelist_view(request, context)

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Jobs enter through POST /job only: one write path.
        return False

    @admin.display(description="status", ordering="status")
    def shown_status(self, job: Job) -> str:
        if job.status == Job.Status.QUEUED and job.is_expired:
            return "expired (not yet swept)"
        if job.status == Job.Status.LEASED and job.lease_expires_at is not None:
            # In the status column, not one of its own: the list fits 1,280 px.
            until = timezone.localtime(job.lease_expires_at).strftime("%H:%M:%S")
            ran_out = job.lease_expires_at <= timezone.now()
            return f"Leased, {'ran out at' if ran_out else 'until'} {until}"
        return job.get_status_display()

    @admin.display(description="age", ordering="created_at")
    def age(self, job: Job) -> str:
        # "2 hours", not "2 hours, 3 minutes": one short line in the list.
        return timesince(job.created_at, timezone.now(), depth=1)

    @admin.display(description="lease", ordering="lease_expires_at")
    def lease(self, job: Job) -> str:
        """Who holds the job under a lease, and when the lease ends."""
        if job.status != Job.Status.LEASED or job.lease_expires_at is None:
            return "-"
        now = timezone.now()
        until = timezone.localtime(job.lease_expires_at).strftime("%H:%M:%S")
        if job.lease_expires_at <= now:
            return f"ran out at {until} (put back at the next sweep)"
        return f"until {until} (in {timesince(now, job.lease_expires_at)})"

    @admin.display(description="fields")
    def readable_fields(self, job: Job) -> str:
        return format_html(
            "<pre>{}</pre>", json.dumps(job.fields, indent=2, ensure_ascii=False)
        )

    @admin.action(description="Requeue selected jobs (fresh expiry)")
    def requeue(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        from jobs.services import requeue

        count = requeue(list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} job(s) requeued.", messages.SUCCESS)

    @admin.action(description="Expire selected jobs")
    def expire(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        count = queryset.exclude(status=Job.Status.EXPIRED).update(
            status=Job.Status.EXPIRED,
            expires_at=timezone.now(),
            lease_token=None,
            lease_expires_at=None,
        )
        self.message_user(request, f"{count} job(s) expired.", messages.SUCCESS)
