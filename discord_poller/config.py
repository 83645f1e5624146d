"""The poller's settings, checked once at start-up."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from discord_poller.client import discord_user_agent
from discord_poller.pacing import DEFAULT_BURST_SECONDS
from discord_poller.publisher import DEFAULT_CAPACITY

# Discord asks bots to name themselves: "DiscordBot ($url, $version)".
VERSION: Final = "1.0.0"
DEFAULT_BOT_URL: Final = "https://example.com/job-gateway"
USER_AGENT: Final = discord_user_agent(DEFAULT_BOT_URL, VERSION)
_CHANNEL_ID = re.compile(r"[0-9]{1,20}")
# An http(s) URL that keeps the header's "(url, version)" readable: printable
# ASCII, no space, comma or parenthesis.
_BOT_URL = re.compile(r"https?://[!-'*+\--~]+")
# rest: poll the channels; gateway: receive their messages over the Gateway.
MODES: Final = ("rest", "gateway")


class ConfigError(Exception):
    """The settings do not allow the poller to start; the message says which."""


@dataclass(frozen=True)
class PollerConfig:
    """Everything the poller reads from Django's settings."""

    channel_ids: tuple[str, ...]
    discord_token: str
    discord_api_base: str
    poll_seconds: float
    burst_poll_seconds: float
    service_base_url: str
    api_key: str
    hmac_secret: str
    job_ttl_seconds: int
    burst_seconds: float = DEFAULT_BURST_SECONDS
    buffer_size: int = DEFAULT_CAPACITY
    mode: str = "rest"
    user_agent: str = USER_AGENT

    def __repr__(self) -> str:
        # Never print the secrets, whoever logs this object.
        return f"<PollerConfig {self.mode} channels={','.join(self.channel_ids)}>"

    @classmethod
    def from_settings(cls, settings: Any) -> PollerConfig:
        """Read Django's settings; raise ``ConfigError`` naming what is missing."""
        required = {
            "API_KEY": settings.API_KEYS,
            "HMAC_SECRET": settings.HMAC_SECRETS,
            "CHANNEL_ID": settings.CHANNEL_IDS,
            "DISCORD_TOKEN": settings.DISCORD_TOKEN,
        }
        missing = [name for name, value in required.items() if not value]
        if missing:
            raise ConfigError(f"Refusing to start: {', '.join(missing)} not set.")
        token: str = settings.DISCORD_TOKEN
        if not token.strip() or "\n" in token or "\r" in token:
            raise ConfigError("DISCORD_TOKEN is blank or spans several lines.")
        mode = str(getattr(settings, "DISCORD_MODE", "rest") or "rest").lower()
        if mode not in MODES:
            raise ConfigError(f"DISCORD_MODE must be rest or gateway, not {mode!r}.")
        if mode == "gateway" and not token.startswith("Bot "):
            raise ConfigError(
                'DISCORD_MODE=gateway needs a bot token: DISCORD_TOKEN="Bot <token>".'
            )
        channels = tuple(dict.fromkeys(str(c) for c in settings.CHANNEL_IDS))
        for channel in channels:
            if not _CHANNEL_ID.fullmatch(channel):
                raise ConfigError(
                    f"CHANNEL_ID must list Discord channel ids (digits), "
                    f"not {channel!r}."
                )
        bot_url = str(getattr(settings, "DISCORD_BOT_URL", "") or DEFAULT_BOT_URL)
        if not _BOT_URL.fullmatch(bot_url):
            raise ConfigError(
                "DISCORD_BOT_URL must be an http(s) URL in ASCII, without spaces, "
                f"commas or parentheses, not {bot_url!r}."
            )
        return cls(
            channel_ids=channels,
            discord_token=token,
            discord_api_base=settings.DISCORD_API_BASE,
            poll_seconds=settings.DISCORD_POLL_SECONDS,
            burst_poll_seconds=settings.BURST_POLL_SECONDS,
            service_base_url=settings.SERVICE_BASE_URL,
            # The first of a rotating list is the one to sign with.
            api_key=settings.API_KEYS[0],
            hmac_secret=settings.HMAC_SECRETS[0],
            job_ttl_seconds=settings.JOB_TTL_SECONDS,
            mode=mode,
            user_agent=discord_user_agent(bot_url, VERSION),
        )
