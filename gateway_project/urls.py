from __future__ import annotations

from django.contrib import admin
from django.urls import path

from jobs import dashboard, metrics_endpoint, schema, views

# The admin index links to the dashboard. Set here rather than by overriding
# admin/index.html: the admin app comes before ours, so its own template wins.
admin.site.index_template = "admin/index_with_dashboard.html"

urlpatterns = [
    # Before the admin's own URLs, whose catch-all would answer 404.
    path(
        "admin/dashboard/",
        admin.site.admin_view(dashboard.page),
        name="admin-dashboard",
    ),
    path(
        "admin/dashboard/data",
        admin.site.admin_view(dashboard.data),
        name="admin-dashboard-data",
    ),
    path("admin/", admin.site.urls),
    path("job", views.post_job, name="post-job"),
    path("job/next", views.next_job, name="next-job"),
    path("job/<int:pk>/ack", views.ack_job, name="ack-job"),
    path("job/<int:pk>/release", views.release_job, name="release-job"),
    path("ws/ticket", views.ws_ticket, name="ws-ticket"),
    path("health", views.health, name="health"),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", metrics_endpoint.metrics_view, name="metrics"),
    path("openapi.json", schema.openapi_view, name="openapi"),
    # Everything else is the API's 404, in JSON, whatever DEBUG says.
    path("", views.not_found),
    path("<path:unknown>", views.not_found),
]
