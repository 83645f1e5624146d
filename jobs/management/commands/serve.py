"""``python manage.py serve``: the gateway on every core, one port, N daphne processes.

The listening socket is opened once, here, and each of ``WEB_CONCURRENCY``
daphne children serves it through daphne's ``--fd`` option; the kernel hands
each new connection to whichever child accepts first. Children share the
queue, the channel layer and the counters through Redis (and, for
``/metrics``, through ``PROMETHEUS_MULTIPROC_DIR``), so any of them answers
for all. A child that dies is started again, at once the first time and with
a growing pause if it keeps dying young; SIGTERM or SIGINT stops every child
through daphne's own shutdown and waits for them (docs/deploy.md, "Several
processes").

With one process (the embedded default) daphne is run in this process's
place: nothing supervises it but the platform, as before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

logger = logging.getLogger("gateway.serve")

APPLICATION = "gateway_project.asgi:application"
# What every start command of the gateway gives daphne (Procfile, render.yaml).
DAPHNE_OPTIONS = ("--ping-interval", "20", "--ping-timeout", "30")
# A child that exits sooner than this after its start died young: the next
# start waits, twice as long each time, up to MAX_RESTART_DELAY.
YOUNG_SECONDS = 10.0
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
# How long the children get to stop after SIGTERM before they are killed.
STOP_SECONDS = 25.0
BACKLOG = 2048


class Command(BaseCommand):
    help = (
        "Serve the gateway with WEB_CONCURRENCY daphne processes on one port "
        "(one process: daphne itself). Arguments after -- go to daphne."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--processes",
            type=int,
            default=None,
            help="daphne processes (default: WEB_CONCURRENCY)",
        )
        parser.add_argument(
            "--bind",
            default="0.0.0.0",  # noqa: S104 (a server: behind the platform's proxy)
            help="address to listen on (0.0.0.0)",
        )
        parser.add_argument(
            "--port", type=int, default=None, help="port to listen on (default: PORT)"
        )
        parser.add_argument("daphne_args", nargs=argparse.REMAINDER)

    def handle(self, *args: Any, **options: Any) -> None:
        processes: int = options["processes"] or settings.WEB_CONCURRENCY
        port: int = options["port"] or settings.PORT
        extra = [arg for arg in options["daphne_args"] if arg != "--"]
        if processes < 1:
            raise CommandError(f"--processes must be at least 1, not {processes}.")
        if processes > 1 and not settings.REDIS_URL:
            raise CommandError(
                f"{processes} processes need REDIS_URL: without Redis the queue, "
                "channel layer and counters are each process's own. Set "
                "REDIS_URL, or WEB_CONCURRENCY=1."
            )
        listener = listen(options["bind"], port)
        argv = daphne_argv(listener, extra)
        if processes == 1:
            os.execv(sys.executable, argv)  # noqa: S606 (our own interpreter)
        logger.info(
            "Serving on %s:%d with %d daphne processes.",
            options["bind"],
            port,
            processes,
        )
        with metrics_directory() as directory:
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
            asyncio.run(Supervisor(argv, listener, processes, env).run())


def listen(host: str, port: int) -> socket.socket:
    """The one listening socket every child serves; one line if the port is taken."""
    if ":" in host:
        # daphne adopts an inherited socket as IPv4 only (its fd endpoint).
        raise CommandError(f"--bind takes an IPv4 address, not {host}.")
    try:
        listener = socket.create_server((host, port), backlog=BACKLOG)
    except OSError as exc:
        raise CommandError(
            f"Cannot listen on {host}:{port} ({exc.strerror}): is another "
            "gateway running? Choose another port with PORT=."
        ) from None
    listener.set_inheritable(True)
    return listener


def daphne_argv(listener: socket.socket, extra: list[str]) -> list[str]:
    """daphne serving ``listener``, the socket it inherits (``--fd``)."""
    return [
        sys.executable, "-m", "daphne", "--fd", str(listener.fileno()),
        *DAPHNE_OPTIONS, *extra, APPLICATION,
    ]  # fmt: skip


@contextlib.contextmanager
def metrics_directory() -> Iterator[Path]:
    """``PROMETHEUS_MULTIPROC_DIR``, empty as the children start (prometheus-client).

    The operator's, emptied, when set; otherwise a temporary one, removed after.
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    try:
        yield path
    finally:
        if not given:
            shutil.rmtree(path, ignore_errors=True)


class Supervisor:
    """Keeps ``count`` children running until told to stop."""

    def __init__(
        self, argv: list[str], listener: socket.socket, count: int, env: dict[str, str]
    ) -> None:
        self.argv = argv
        self.listener = listener
        self.count = count
        self.env = env
        self.stopping = asyncio.Event()
        self.children: dict[int, asyncio.subprocess.Process] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop, signum)
        await asyncio.gather(*(self._keep(slot) for slot in range(self.count)))
        logger.info("Every daphne process has stopped.")

    def _stop(self, signum: int) -> None:
        if self.stopping.is_set():
            # A second signal: no more waiting.
            for child in self.children.values():
                _signal(child, signal.SIGKILL)
            return
        logger.info("%s: stopping every daphne process.", signal.Signals(signum).name)
        self.stopping.set()

    async def _keep(self, slot: int) -> None:
        """Run one child in ``slot``, again and again, until stopping."""
        delay = 0.0
        while not self.stopping.is_set():
            child = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, pass_fds=(self.listener.fileno(),)
            )
            self.children[slot] = child
            started = asyncio.get_running_loop().time()
            exited = asyncio.ensure_future(child.wait())
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
            if self.stopping.is_set():
                stop.cancel()
                await self._stop_child(child, exited)
                return
            stop.cancel()
            self._forget_metrics(child.pid)
            lived = asyncio.get_running_loop().time() - started
            delay = _next_delay(delay, lived)
            logger.warning(
                "daphne process %d exited with %s after %.0f s; starting another%s.",
                child.pid,
                _exit_text(child.returncode),
                lived,
                f" in {delay:g} s" if delay else "",
            )
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)

    async def _stop_child(
        self, child: asyncio.subprocess.Process, exited: asyncio.Future[int]
    ) -> None:
        _signal(child, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), STOP_SECONDS)
        except TimeoutError:
            logger.warning("daphne process %d did not stop; killed.", child.pid)
            _signal(child, signal.SIGKILL)
            await exited
        self._forget_metrics(child.pid)

    def _forget_metrics(self, pid: int) -> None:
        """A dead child's live gauges (connected clients) leave the sums."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.env["PROMETHEUS_MULTIPROC_DIR"])  # type: ignore[no-untyped-call]


def _next_delay(previous: float, lived: float) -> float:
    """No wait after a child that lived; a doubling one after each that died young."""
    if lived >= YOUNG_SECONDS:
        return 0.0
    return min(MAX_RESTART_DELAY, previous * 2 if previous else FIRST_RESTART_DELAY)


def _signal(child: asyncio.subprocess.Process, signum: int) -> None:
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return signal.Signals(-code).name
    return f"code {code}"
