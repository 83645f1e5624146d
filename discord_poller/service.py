"""The poller as a process: its clients, its signals and its status row."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any, Final

from discord_poller.client import DiscordClient, Unauthorized
from discord_poller.config import PollerConfig
from discord_poller.discord_gateway_protocol import GatewayFatal
from discord_poller.listener import GatewayListener
from discord_poller.publisher import Publisher
from discord_poller.runner import Poller, Reader
from discord_poller.status import StatusReporter

logger = logging.getLogger(__name__)

# Shutdown must fit in a second: the last status write gets this long.
FINAL_WRITE_SECONDS: Final = 0.3
# --once: how long to keep trying to publish what it found.
ONCE_DRAIN_SECONDS: Final = 10.0


class PollerFailed(Exception):
    """The poller cannot go on; the message says why, without any secret."""


async def serve(
    config: PollerConfig,
    *,
    once: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Poll (or listen) until SIGTERM or SIGINT (or ``stop``); ``once``: one cycle.

    Raises ``PollerFailed`` when the token is rejected, when the Gateway closes
    for good, or when ``once`` leaves a channel unread or jobs unpublished.
    ``once`` always reads over REST.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with (
            DiscordClient(
                config.discord_token,
                config.discord_api_base,
                user_agent=config.user_agent,
            ) as discord,
            Publisher(
                config.service_base_url,
                config.api_key,
                config.hmac_secret,
                ttl_seconds=config.job_ttl_seconds,
                capacity=config.buffer_size,
            ) as publisher,
        ):
            poller = Poller(
                discord,
                publisher,
                config.channel_ids,
                ttl_seconds=config.job_ttl_seconds,
                poll_seconds=config.poll_seconds,
                burst_poll_seconds=config.burst_poll_seconds,
                burst_seconds=config.burst_seconds,
            )
            report: Callable[[str], dict[str, Any]] = poller.report
            readers: list[Reader] | None = None
            if config.mode == "gateway" and not once:
                listener = GatewayListener(
                    poller, discord, config.discord_token, user_agent=config.user_agent
                )
                report, readers = listener.report, listener.readers
                logger.info(
                    "reading channel(s) %s from the Discord Gateway; publishing to %s",
                    ", ".join(config.channel_ids),
                    config.service_base_url,
                )
            else:
                logger.info(
                    "polling channel(s) %s every %.3g s (%.3g s in bursts); "
                    "publishing to %s",
                    ", ".join(config.channel_ids),
                    config.poll_seconds,
                    config.burst_poll_seconds,
                    config.service_base_url,
                )
            reporter = StatusReporter(lambda: report("running"))
            await _run(poller, reporter, report, readers, stop, once)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _run(
    poller: Poller,
    reporter: StatusReporter,
    report: Callable[[str], dict[str, Any]],
    readers: list[Reader] | None,
    stop: asyncio.Event,
    once: bool,
) -> None:
    state = "stopped"
    reporting = asyncio.create_task(reporter.run(stop))
    try:
        if once:
            left = await poller.run_once(stop, ONCE_DRAIN_SECONDS)
            if stop.is_set():  # a signal asked for a quick exit
                return
            problems = [
                f"channel {channel} could not be read ({error})"
                for channel, error in poller.unread().items()
            ]
            if left:
                problems.append(f"{left} jobs could not be published")
            if problems:
                state = "failed"
                raise PollerFailed("; ".join(problems) + ".")
        else:
            await poller.run(stop, readers)
    except GatewayFatal as exc:
        state = "failed"
        raise PollerFailed(str(exc)) from None
    except Unauthorized:
        state = "failed"
        raise PollerFailed(
            "Discord rejected DISCORD_TOKEN (401 Unauthorized): check the bot "
            'token (written "Bot <token>"). Not retrying.'
        ) from None
    finally:
        stop.set()
        reporting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporting
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reporter.write(report(state)), FINAL_WRITE_SECONDS)
        reporter.close()
        logger.info("the poller has %s", state)
