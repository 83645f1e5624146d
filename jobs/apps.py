from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core.signals import setting_changed


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs"

    def ready(self) -> None:
        setting_changed.connect(_forget_redis_clients)


def _forget_redis_clients(*, setting: str, **kwargs: Any) -> None:
    # Tests point REDIS_URL at a server of their own: drop clients of the old one.
    if setting == "REDIS_URL":
        from jobs import redis_clients

        redis_clients.forget()
