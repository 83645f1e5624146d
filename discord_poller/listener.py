"""Gateway mode: jobs from the events Discord pushes, not from polls. Django-free.

The Gateway connection (``discord_gateway``) hands over ``MESSAGE_CREATE`` and
``MESSAGE_UPDATE``; those of the configured channels go through the poller's
own cursor, parser and publisher (``Poller.take_event``). Whenever a new
session starts (at start-up, and after any reconnect that could not resume),
each channel is read over REST from its cursor, the last message seen: what
was posted while no session was up is published too. A message seen both ways
is taken once here, and the gateway de-duplicates by ``message_id`` anyway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Final

from discord_poller.client import DiscordClient
from discord_poller.discord_gateway import DiscordGateway
from discord_poller.discord_gateway_protocol import GatewayInfo
from discord_poller.runner import Poller, Reader

logger = logging.getLogger(__name__)

MESSAGE_EVENTS: Final = frozenset({"MESSAGE_CREATE", "MESSAGE_UPDATE"})


class GatewayListener:
    """Reads the poller's channels through the Gateway, catching up over REST."""

    def __init__(
        self,
        poller: Poller,
        discord: DiscordClient,
        token: str,
        *,
        user_agent: str | None = None,
    ) -> None:
        self._poller = poller
        self._discord = discord
        self._catch_up_wanted = asyncio.Event()
        self.catch_ups = 0
        self.gateway = DiscordGateway(
            token,
            fetch_info=self._fetch_info,
            on_dispatch=self._on_dispatch,
            on_session=self._new_session,
            user_agent=user_agent,
        )

    @property
    def readers(self) -> list[Reader]:
        """What ``Poller.run`` runs instead of its poll loops."""
        return [self.gateway.run, self._catch_up_forever]

    def report(self, state: str = "running") -> dict[str, Any]:
        """The poller's report, with the mode and the Gateway connection."""
        report = self._poller.report(state)
        report["mode"] = "gateway"
        report["discord"]["gateway"] = {
            **self.gateway.stats.as_report(),
            "catch_ups": self.catch_ups,
        }
        return report

    def _new_session(self) -> None:
        # Called on READY, before the session's first event is handled: until
        # the catch-up is done, events must not move the cursors past the
        # messages it has yet to read.
        for channel in self._poller.channels.values():
            channel.catching_up = True
        self._catch_up_wanted.set()

    async def _fetch_info(self) -> GatewayInfo:
        return GatewayInfo.parse(await self._discord.gateway_bot())

    def _on_dispatch(self, name: str, data: Any) -> None:
        if name not in MESSAGE_EVENTS or not isinstance(data, Mapping):
            return
        channel_id = data.get("channel_id")
        if not isinstance(channel_id, str) or channel_id not in self._poller.channels:
            return
        self._poller.take_event(channel_id, data, edited=name == "MESSAGE_UPDATE")

    async def _catch_up_forever(self, stop: asyncio.Event) -> None:
        """After each new session, read every channel over REST from its cursor."""
        while not stop.is_set():
            await self._catch_up_wanted.wait()
            self._catch_up_wanted.clear()
            found = self._poller.stats.jobs_found
            channels = list(self._poller.channels)
            await asyncio.gather(
                *(self._poller.catch_up(channel, stop) for channel in channels)
            )
            if not self._catch_up_wanted.is_set():  # no newer session meanwhile
                for channel in self._poller.channels.values():
                    channel.catching_up = False
            self.catch_ups += 1
            logger.info(
                "caught up over REST on %d channel(s): %d job(s) found",
                len(channels),
                self._poller.stats.jobs_found - found,
            )
