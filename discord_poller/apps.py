from __future__ import annotations

from django.apps import AppConfig


class DiscordPollerConfig(AppConfig):
    name = "discord_poller"
    verbose_name = "Discord poller"
