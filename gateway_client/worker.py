"""The reference worker: jobs from the gateway, one JSON line each on stdout.

It pulls with ``CONCURRENCY`` long-polls of ``GET /job/next`` (each job to this
worker alone) or, with ``--ws``, follows the push stream (every job, to every
client). Failures worth retrying are retried with jittered backoff; refused
credentials stop it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random as _random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from gateway_client.backoff import Backoff
from gateway_client.client import GatewayClient, LeasedJob
from gateway_client.config import WorkerConfig
from gateway_client.errors import AuthError, BadFilter, GatewayError, LeaseLost

logger = logging.getLogger("gateway_client.worker")

Sleep = Callable[[float], Awaitable[None]]


class WorkerError(Exception):
    """The worker must stop; the message is for the operator, on one line."""


class OutputClosed(WorkerError):
    """Whoever read our stdout has gone (``| head``)."""


def describe(exc: GatewayError) -> str:
    """One line for the operator; the gateway's error bodies never hold a secret."""
    if isinstance(exc, AuthError):
        return (
            f"the gateway refused our credentials ({exc.code}: {exc.detail}); "
            "check API_KEY and HMAC_SECRET"
        )
    if isinstance(exc, BadFilter):
        return (
            f"the gateway refused the filter ({exc.code}: {exc.detail}); "
            "check --where/WHERE, --channels/CHANNELS and --tier/TIER"
        )
    return f"the gateway failed the request: {exc}"


class Worker:
    """Fetches jobs and writes them to ``out`` until ``stop`` is set."""

    def __init__(
        self,
        client: GatewayClient,
        config: WorkerConfig,
        *,
        out: TextIO | None = None,
        stop: asyncio.Event | None = None,
        sleep: Sleep | None = None,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.config = config
        self.out = out if out is not None else sys.stdout
        self.stop = stop if stop is not None else asyncio.Event()
        self.sleep = sleep if sleep is not None else self._sleep_unless_stopped
        self.random = random
        self.clock = clock

    def backoff(self) -> Backoff:
        """A fresh backoff schedule with the configured bounds."""
        return Backoff(
            self.config.initial_backoff, self.config.max_backoff, random=self.random
        )

    # --- Pulling ------------------------------------------------------------

    async def poll_once(self, backoff: Backoff) -> dict[str, Any] | None:
        """One long-poll: write the job it brings and return it, else None.

        A retryable failure waits out its backoff here; any other raises
        ``WorkerError``, as does the ``RETRIES``-th failure in a row.
        """
        started = self.clock()
        leased: LeasedJob | None = None
        try:
            if self.config.lease is None:
                job = await self.client.next_job(
                    wait=self.config.wait,
                    where=self.config.job_filter.where,
                    channels=self.config.job_filter.channels,
                    tier=self.config.job_filter.tier,
                )
            else:
                leased = await self.client.lease_job(
                    self.config.lease,
                    wait=self.config.wait,
                    where=self.config.job_filter.where,
                    channels=self.config.job_filter.channels,
                    tier=self.config.job_filter.tier,
                )
                job = None if leased is None else leased.job
        except GatewayError as exc:
            if not exc.retryable:
                raise WorkerError(describe(exc)) from None
            await self._retry_later(backoff, exc)
            return None
        backoff.reset()
        if job is None:
            held = self.clock() - started
            if not self.config.wait or held < self.config.wait / 2:
                # Nothing held the request (plain polling, or something in
                # the way that ignores wait=): pause rather than spin.
                await self.sleep(self.config.initial_backoff)
            return None
        if leased is None:
            self.emit(job)
            return job
        try:
            self.emit(job)
        except OutputClosed:
            # Not written: the next worker has it at once.
            await self._finish(leased, self.client.release)
            raise
        await self._finish(leased, self.client.ack)
        return job

    async def _finish(
        self, leased: LeasedJob, how: Callable[[LeasedJob], Awaitable[None]]
    ) -> None:
        """Ack or release a lease; a failure only leaves it to run out."""
        try:
            await how(leased)
        except LeaseLost:
            logger.warning(
                "the lease on job %s ran out before it was settled: "
                "the gateway may hand it out again",
                leased.id,
            )
        except GatewayError as exc:
            logger.warning(
                "could not settle the lease on job %s (%s): it goes back "
                "to the queue when the lease ends",
                leased.id,
                exc,
            )

    async def pull(self) -> None:
        """Run ``CONCURRENCY`` long-poll loops until ``stop``; raise if one fails."""
        loops = [
            asyncio.create_task(self._poll_loop(), name=f"poll-{n}")
            for n in range(self.config.concurrency)
        ]
        await self._until_stopped(loops)

    async def _poll_loop(self) -> None:
        backoff = self.backoff()
        while not self.stop.is_set():
            await self.poll_once(backoff)

    # --- Streaming ----------------------------------------------------------

    async def follow(self, since: int | None = None) -> None:
        """Write every job pushed on ``/ws`` until ``stop``; raise on a fatal error.

        Every job that matches the configured filter, that is.
        """
        await self._until_stopped([asyncio.create_task(self._stream(since))])

    async def _stream(self, since: int | None) -> None:
        job_filter = self.config.job_filter
        jobs = self.client.stream(
            job_filter.channels,
            since,
            where=job_filter.where,
            tier=job_filter.tier,
            retries=self.config.retries,
            initial_backoff=self.config.initial_backoff,
            max_backoff=self.config.max_backoff,
        )
        try:
            async with contextlib.aclosing(jobs):
                async for job in jobs:
                    self.emit(job)
        except GatewayError as exc:
            if exc.retryable:  # only after RETRIES failures in a row
                raise WorkerError(f"giving up: {exc}") from None
            raise WorkerError(describe(exc)) from None

    # --- Shared -------------------------------------------------------------

    def emit(self, job: dict[str, Any]) -> None:
        """Write one job as a JSON line, flushed so that pipes see it at once."""
        try:
            self.out.write(json.dumps(job, separators=(",", ":")) + "\n")
            self.out.flush()
        except BrokenPipeError:
            raise OutputClosed(
                f"stdout was closed; job {job.get('id')} ({job.get('job_id')}) "
                "was taken but not written"
            ) from None

    async def _retry_later(self, backoff: Backoff, exc: GatewayError) -> None:
        delay = backoff.next_delay(exc.retry_after)
        if self.config.retries and backoff.failures >= self.config.retries:
            raise WorkerError(
                f"giving up after {backoff.failures} failures in a row: {exc}"
            )
        logger.warning("%s; retrying in %.2fs", exc, delay)
        await self.sleep(delay)

    async def _sleep_unless_stopped(self, delay: float) -> None:
        # A stop signal ends the wait at once rather than after the backoff.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), delay)

    async def _until_stopped(self, tasks: list[asyncio.Task[None]]) -> None:
        """Wait for ``stop`` or a task's failure, then cancel everything in flight."""
        stopped = asyncio.create_task(self.stop.wait())
        try:
            done, _ = await asyncio.wait(
                [stopped, *tasks], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (stopped, *tasks):
                task.cancel()
            await asyncio.gather(stopped, *tasks, return_exceptions=True)
        for task in done:
            if task is not stopped:
                task.result()  # raises the task's WorkerError


async def run(
    config: WorkerConfig, *, ws: bool = False, since: int | None = None
) -> int:
    """Run the worker until SIGINT or SIGTERM (0) or a fatal error (1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with GatewayClient(
            config.base_url,
            api_key=config.api_key,
            hmac_secret=config.hmac_secret,
            timeout=config.answer_timeout,
            max_connections=config.concurrency,
        ) as client:
            worker = Worker(client, config, stop=stop)
            if ws:
                logger.info(
                    "following %s for jobs matching %s",
                    client.ws_url,
                    config.job_filter,
                )
                await worker.follow(since)
            else:
                logger.info(
                    "pulling jobs matching %s from %s with %d long-polls of %gs",
                    config.job_filter,
                    config.base_url,
                    config.concurrency,
                    config.wait,
                )
                await worker.pull()
    except WorkerError as exc:
        logger.error("%s", exc)
        if isinstance(exc, OutputClosed):
            _silence_stdout()
        return 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    logger.info("stopped")
    return 0


def _silence_stdout() -> None:
    # The interpreter flushes stdout on exit; with the reader gone that would
    # print a second BrokenPipeError.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
