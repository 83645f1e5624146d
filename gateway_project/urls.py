from __future__ import annotations

from django.contrib import admin
from django.urls import path

from jobs import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("job", views.post_job, name="post-job"),
    path("job/next", views.next_job, name="next-job"),
    path("health", views.health, name="health"),
    path("healthz", views.healthz, name="healthz"),
    # Everything else is the API's 404, in JSON, whatever DEBUG says.
    path("", views.not_found),
    path("<path:unknown>", views.not_found),
]
