"""The poll loop: read each channel, parse its messages, hand jobs to the
publisher. Django-free.

One task per channel calls ``poll_channel`` (one request, one page) and waits
the delay it returns; tests call ``poll_channel`` directly. Discord's errors
are handled per channel: a channel the bot may not read is backed off without
stopping the others; a rejected token stops everything.

In Gateway mode (``discord_poller.listener``) the same channels, cursors,
parser and publisher serve: ``take_event`` takes a message pushed by the
Gateway, and ``catch_up`` reads over REST what came while no session was up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from discord_poller.client import (
    Banned,
    DiscordClient,
    DiscordError,
    Forbidden,
    NotFound,
    RateLimited,
    Unauthorized,
)
from discord_poller.cursor import Cursor, snowflake_ms
from discord_poller.discord_gateway_protocol import GatewayFatal
from discord_poller.embeds import parse_message
from discord_poller.pacing import DEFAULT_BURST_SECONDS, Pace
from discord_poller.publisher import PendingJob, Publisher
from discord_poller.waits import run_until, wait_for_stop

logger = logging.getLogger(__name__)

PAGE_SIZE: Final = 100  # Discord's largest page
# A channel the bot may not read (403/404): first wait, and the longest.
ACCESS_BACKOFF: Final = 60.0
ACCESS_BACKOFF_MAX: Final = 960.0
# Discord failing on its side (5xx, unreachable): first wait, and the longest.
ERROR_BACKOFF: Final = 1.0
ERROR_BACKOFF_MAX: Final = 30.0
# After a bug of ours: never spin, never die.
UNEXPECTED_BACKOFF: Final = 5.0
# --once reads at most this many pages per channel.
ONCE_MAX_PAGES: Final = 1000
# Message ids remembered (Gateway mode): those taken, so that one seen both
# as an event and over REST is taken once, and those whose job was found, so
# that an edit does not publish it again.
REMEMBERED_IDS: Final = 10_000

_SNOWFLAKE = re.compile(r"[0-9]{1,20}")

Reader = Callable[[asyncio.Event], Awaitable[None]]


def backoff(first: float, longest: float, failures: int) -> float:
    """``first`` doubled for each failure after the first, at most ``longest``."""
    return min(first * 2.0 ** min(max(failures - 1, 0), 30), longest)


def _iso(unix: float | None) -> str | None:
    return None if unix is None else datetime.fromtimestamp(unix, UTC).isoformat()


@dataclass
class ChannelState:
    """One channel's reading: where it stands, its pace, how its polls went."""

    channel_id: str
    pace: Pace
    cursor: Cursor = field(default_factory=Cursor)
    failures: int = 0  # in a row; reset by an answered poll
    caught_up: bool = False  # the last answered poll returned a short page
    # Gateway mode: a catch-up over REST is due or under way, so the cursor is
    # not yet the last message of an unbroken run; events must not move it.
    catching_up: bool = False
    last_poll_at: float | None = None  # unix seconds of the last answered poll
    last_error: str | None = None


@dataclass
class PollStats:
    """What the polls found, for the status report."""

    polls: int = 0
    messages: int = 0
    jobs_found: int = 0
    skipped_no_job_id: int = 0
    skipped_stale: int = 0  # older than the job TTL when read
    errors: int = 0
    last_poll_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None


class Poller:
    """Reads the channels through ``discord``; jobs go to ``publisher``.

    ``clock`` gives unix seconds (message ages); ``monotonic`` paces the polls.
    """

    def __init__(
        self,
        discord: DiscordClient,
        publisher: Publisher,
        channel_ids: Iterable[str],
        *,
        ttl_seconds: float,
        poll_seconds: float,
        burst_poll_seconds: float,
        burst_seconds: float = DEFAULT_BURST_SECONDS,
        access_backoff: float = ACCESS_BACKOFF,
        error_backoff: float = ERROR_BACKOFF,
        shutdown_drain: float = 0.4,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._discord = discord
        self._publisher = publisher
        self._ttl = ttl_seconds
        self._access_backoff = access_backoff
        self._error_backoff = error_backoff
        self._shutdown_drain = shutdown_drain
        self._clock = clock
        self._monotonic = monotonic
        self.channels = {
            channel_id: ChannelState(
                channel_id, Pace(poll_seconds, burst_poll_seconds, burst_seconds)
            )
            for channel_id in channel_ids
        }
        self.stats = PollStats()
        self.fatal: BaseException | None = None
        self._taken = _RecentIds(REMEMBERED_IDS)
        self._with_job = _RecentIds(REMEMBERED_IDS)
        # --once: a failed poll ends its channel's reading; nothing retries it.
        self._once = False

    # --- One poll -------------------------------------------------------------

    async def poll_channel(self, channel_id: str) -> float:
        """Fetch the channel's next page and hand its jobs to the publisher.

        Returns the seconds until the channel's next poll; 0.0 when a full page
        came, as more messages are waiting. Raises ``Unauthorized`` only.
        """
        channel = self.channels[channel_id]
        started = self._monotonic()
        after = channel.cursor.after(self._clock() * 1000, self._ttl)
        try:
            page = await self._discord.fetch_messages(
                channel_id, after=after, limit=PAGE_SIZE
            )
        except Unauthorized:
            raise
        except DiscordError as exc:
            return self._failed(channel, exc)
        channel.failures, channel.last_error = 0, None
        channel.last_poll_at = self.stats.last_poll_at = self._clock()
        channel.caught_up = len(page) < PAGE_SIZE
        self.stats.polls += 1
        found = self._take(channel_id, channel.cursor.advance(page))
        now = self._monotonic()
        if found:
            channel.pace.found_jobs(now)
        if len(page) >= PAGE_SIZE:
            return 0.0
        return channel.pace.next_delay(
            now,
            started,
            self._discord.bucket_state(channel_id),
            self._discord.next_allowed_in(channel_id),
        )

    def take_event(
        self, channel_id: str, message: Mapping[str, Any], *, edited: bool = False
    ) -> int:
        """Take a message the Gateway pushed; return the jobs queued (0 or 1).

        A message seen before (over REST, or a replayed event) is not taken
        again. A new message moves the cursor, so that the next catch-up starts
        after it, unless a catch-up is due: the messages between the cursor and
        this one are then still to be read over REST. An edit (``edited``) is
        taken if it now names a job its message did not: a late embed.
        """
        channel = self.channels[channel_id]
        message_id = message.get("id")
        if not isinstance(message_id, str) or not _is_snowflake(message_id):
            return 0  # nothing to date it by, or to resume after
        if message_id in self._taken:
            if not edited or message_id in self._with_job:
                return 0
            return self._take(channel_id, [message], edit=True)
        if not channel.catching_up:
            channel.cursor.advance([message])
        return self._take(channel_id, [message])

    async def catch_up(self, channel_id: str, stop: asyncio.Event) -> None:
        """Read the channel over REST until a short page, retrying failed polls."""
        channel = self.channels[channel_id]
        for _ in range(ONCE_MAX_PAGES):
            delay = await self.poll_channel(channel_id)
            if channel.failures == 0 and channel.caught_up:
                return
            if channel.failures and await wait_for_stop(stop, delay):
                return

    def _take(
        self,
        channel_id: str,
        messages: list[Mapping[str, Any]],
        *,
        edit: bool = False,
    ) -> int:
        """Queue the jobs of new messages (or of an edit), oldest first.

        Returns how many jobs were queued.
        """
        now = self._clock()
        found = 0
        for message in messages:
            message_id = str(message["id"])  # the cursor kept only snowflakes
            if not edit and not self._taken.add(message_id):
                continue  # taken already, from the other source
            if now - snowflake_ms(message_id) / 1000 >= self._ttl:
                self.stats.skipped_stale += 1
                continue
            job = parse_message(message, channel_id)
            if job is None:
                if not edit:
                    self.stats.skipped_no_job_id += 1
                logger.debug("channel %s message %s: no job", channel_id, message_id)
                continue
            self._publisher.submit(PendingJob.from_message(job, channel_id, message_id))
            self._with_job.add(message_id)
            found += 1
        if not edit:
            self.stats.messages += len(messages)
        self.stats.jobs_found += found
        return found

    def _failed(self, channel: ChannelState, exc: DiscordError) -> float:
        """Note a failed poll; return how long to leave the channel alone."""
        channel.failures += 1
        text = f"{type(exc).__name__}: {exc}"
        channel.last_error = self.stats.last_error = text
        self.stats.last_error_at = self._clock()
        self.stats.errors += 1
        channel_id = channel.channel_id
        access = isinstance(exc, Forbidden | NotFound)
        hint = (
            ". Does the bot have View Channel and Read Message History there?"
            if access
            else "."
        )
        if access:
            delay = backoff(self._access_backoff, ACCESS_BACKOFF_MAX, channel.failures)
        elif isinstance(exc, Banned | RateLimited):
            delay = exc.retry_after  # the wait it asks for
        else:
            delay = backoff(self._error_backoff, ERROR_BACKOFF_MAX, channel.failures)
        if self._once:
            logger.error("channel %s: %s%s Not read this run.", channel_id, text, hint)
        elif access:
            logger.error(
                "channel %s: %s%s Trying it again in %.0f s",
                channel_id,
                exc,
                hint,
                delay,
            )
        elif isinstance(exc, Banned | RateLimited):
            # The client has logged the cause.
            logger.warning("channel %s: waiting %.1f s (%s)", channel_id, delay, exc)
        else:
            logger.warning(
                "channel %s: %s; trying again in %.1f s", channel_id, text, delay
            )
        return max(delay, self._discord.next_allowed_in(channel_id))

    # --- Loops ----------------------------------------------------------------

    async def run(
        self, stop: asyncio.Event, readers: Sequence[Reader] | None = None
    ) -> None:
        """Poll and publish until ``stop`` is set, then publish what is left.

        ``readers`` replace the poll loops (Gateway mode). Raises
        ``Unauthorized`` if Discord rejected the token, ``GatewayFatal`` if the
        Gateway closed for good.
        """
        work: list[Awaitable[None]]
        if readers is None:
            work = [self._poll_forever(channel, stop) for channel in self.channels]
        else:
            work = [reader(stop) for reader in readers]
        tasks = [asyncio.create_task(self._guard(item, stop)) for item in work]
        tasks += [
            asyncio.create_task(self._guard(self._publisher.run_channel(channel), stop))
            for channel in self.channels
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Unsent jobs are found again after a restart, as long as they are
            # young: the wait here is short so the process stops within a second.
            left = await self._publisher.drain(self._shutdown_drain)
            if left:
                logger.warning("stopping with %d jobs not published", left)
        if self.fatal is not None:
            raise self.fatal

    async def run_once(self, stop: asyncio.Event, drain_timeout: float = 10.0) -> int:
        """Read every channel until caught up, publish; return jobs left unsent.

        A channel whose poll failed is not tried again: ``unread()`` names it
        afterwards. Raises ``Unauthorized`` if Discord rejected the token.
        """
        self._once = True

        async def catch_up(channel_id: str) -> None:
            for _ in range(ONCE_MAX_PAGES):
                if await self.poll_channel(channel_id) > 0:
                    return

        await run_until(stop, *(catch_up(channel) for channel in self.channels))
        return await self._publisher.drain(drain_timeout, stop)

    def unread(self) -> dict[str, str]:
        """The channels whose last poll failed, each with its error."""
        return {
            channel.channel_id: channel.last_error or "not read"
            for channel in self.channels.values()
            if channel.failures
        }

    async def _poll_forever(self, channel_id: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                delay = await self.poll_channel(channel_id)
            except Unauthorized:
                raise
            except Exception:
                logger.exception(
                    "channel %s: unexpected error; trying again in %.0f s",
                    channel_id,
                    UNEXPECTED_BACKOFF,
                )
                delay = UNEXPECTED_BACKOFF
            if await wait_for_stop(stop, delay):
                return

    async def _guard(self, work: Any, stop: asyncio.Event) -> None:
        """Run a worker; if it fails, stop everything rather than limp on."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except (Unauthorized, GatewayFatal) as exc:
            self.fatal = exc
            stop.set()
        except Exception as exc:
            logger.exception("the poller failed")
            self.fatal = exc
            stop.set()

    # --- Status ---------------------------------------------------------------

    def report(self, state: str = "running") -> dict[str, Any]:
        """The counters and states ``/health`` shows, as JSON-ready values."""
        discord, published = self._discord.stats, self._publisher.stats
        latency = discord.last_latency
        return {
            "state": state,
            "mode": "rest",
            "pid": os.getpid(),
            "discord": {
                "last_poll_at": _iso(self.stats.last_poll_at),
                "latency_ms": None if latency is None else round(latency * 1000, 1),
                "requests": discord.requests,
                "responses": dict(sorted(discord.by_status.items())),
                "rate_limited": discord.rate_limited,
                "rate_limit_wait_seconds": round(discord.rate_limit_wait, 3),
                "bans": discord.bans,
                "errors": self.stats.errors,
                "last_error": self.stats.last_error,
                "last_error_at": _iso(self.stats.last_error_at),
                "channels": {
                    channel.channel_id: {
                        "last_poll_at": _iso(channel.last_poll_at),
                        "failures": channel.failures,
                        "last_error": channel.last_error,
                    }
                    for channel in self.channels.values()
                },
            },
            "jobs": {
                "found": self.stats.jobs_found,
                "published": published.published,
                "duplicates": published.duplicates,
                "skipped_no_job_id": self.stats.skipped_no_job_id,
                "skipped_stale": self.stats.skipped_stale,
                "dropped_expired": published.dropped_expired,
                "dropped_rejected": published.dropped_rejected,
                "dropped_overflow": published.dropped_overflow,
                "buffered": self._publisher.size,
                "retries": published.retries,
                "last_published_at": _iso(published.last_published_at),
                "last_latency_ms": None
                if published.last_latency_ms is None
                else round(published.last_latency_ms, 1),
                "last_error": published.last_error,
            },
        }


class _RecentIds:
    """The last ``size`` ids added, as a set."""

    def __init__(self, size: int) -> None:
        self._ids: set[str] = set()
        self._order: deque[str] = deque()
        self._size = size

    def __contains__(self, item: str) -> bool:
        return item in self._ids

    def add(self, item: str) -> bool:
        """Remember ``item``; False if it was already there."""
        if item in self._ids:
            return False
        self._ids.add(item)
        self._order.append(item)
        if len(self._order) > self._size:
            self._ids.discard(self._order.popleft())
        return True


def _is_snowflake(value: str) -> bool:
    return _SNOWFLAKE.fullmatch(value) is not None
