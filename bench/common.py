"""What every benchmark shares: secrets, signing, statistics and the report table."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gateway_client.signing import signed_headers
from testkit.servers import REPO_ROOT

__all__ = [
    "API_KEY",
    "DJANGO_SECRET_KEY",
    "HMAC_SECRET",
    "REPO_ROOT",
    "RESULTS_DIR",
    "Signer",
    "client_loop_name",
    "cpu_seconds",
    "fmt",
    "format_table",
    "machine_summary",
    "median",
    "ratio",
    "run_async",
    "wait_idle",
]

T = TypeVar("T")

# Throwaway secrets: every server a benchmark starts lives on the loopback only.
API_KEY = "bench-api-key"
HMAC_SECRET = "bench-hmac-secret"
DJANGO_SECRET_KEY = "bench-django-secret-key"

RESULTS_DIR = REPO_ROOT / "bench" / "results"


class Signer:
    """Signed headers, recomputed once per second rather than once per request.

    The contract lets a client reuse one (timestamp, signature) pair within the
    tolerance, and existing clients do; re-signing each second keeps a long
    phase valid without putting an HMAC per request into the client's cost.
    """

    def __init__(self, api_key: str = API_KEY, secret: str = HMAC_SECRET) -> None:
        self.api_key = api_key
        self.secret = secret
        self._second = -1
        self._headers: dict[str, str] = {}

    def headers(self) -> dict[str, str]:
        """The three signing headers for the current second."""
        second = int(time.time())
        if second != self._second:
            self._headers = signed_headers(self.api_key, self.secret, now=second)
            self._second = second
        return self._headers


def cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU time of process ``pid`` (all its threads), on Linux.

    Unlike a rate, CPU per request barely moves when other work shares the
    machine, so it is the steadier figure on a noisy host.
    """
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: count fields after its ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def wait_idle(
    pid: int | None,
    *,
    busy_below: float = 0.05,
    window: float = 0.25,
    timeout: float = 10.0,
) -> float:
    """Wait until process ``pid`` uses under ``busy_below`` of a core; return seconds.

    A load tool that stops leaves requests in the server's socket buffers, which
    the server still serves (and, for ``GET /job/next``, may claim jobs for)
    after the client is gone: the next phase must not start before that.
    """
    started = time.monotonic()
    before = cpu_seconds(pid)
    if before is None:
        time.sleep(1.0)  # no /proc: a fixed pause instead
        return time.monotonic() - started
    while time.monotonic() - started < timeout:
        time.sleep(window)
        after = cpu_seconds(pid)
        if after is None or after - before < busy_below * window:
            break
        before = after
    return time.monotonic() - started


def median(values: Sequence[float]) -> float | None:
    """The median, or None when nothing was measured."""
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or zero."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine, on uvloop when it is installed (it is optional)."""
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)  # type: ignore[no-any-return,unused-ignore]


def client_loop_name() -> str:
    """Which event loop ``run_async`` uses."""
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def machine_summary() -> str:
    """One line on where the figures come from: cores, Python, load, loop."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"cores: {os.cpu_count()}, Python {platform.python_version()} "
        f"({sys.implementation.name}), load average at start: {load}, "
        f"client loop: {client_loop_name()}"
    )


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table whose columns line up in a terminal too."""
    widths = [
        max(len(str(row[column])) for row in [header, *rows])
        for column in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = (
            str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)
        )
        return "| " + " | ".join(padded) + " |"

    separator = "| " + " | ".join("-" * width for width in widths) + " |"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    """A figure for the table: thousands separated, a dash when missing."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """A temporary worktree of ``ref``, removed on the way out."""
    folder = Path(tempfile.mkdtemp(prefix="bench-ref-")) / "tree"
    git = ["git", "-C", str(REPO_ROOT)]
    subprocess.run(
        [*git, "worktree", "add", "--detach", "-q", str(folder), ref], check=True
    )
    try:
        yield folder
    finally:
        subprocess.run(
            [*git, "worktree", "remove", "--force", str(folder)], check=False
        )
        shutil.rmtree(folder.parent, ignore_errors=True)
