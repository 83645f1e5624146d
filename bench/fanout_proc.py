"""What a server process costs, read from ``/proc``: memory (RSS) and CPU time.

Both figures cover the process and its descendants, so that a server forking
workers is measured whole. Linux only; elsewhere they are None.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["cpu_seconds", "process_tree", "rss_kib", "settle"]

_PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _parent_of(pid: int) -> int | None:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: parse after its ")".
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 10_000:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` and its descendants, in KiB; None if it is gone."""
    total, seen = 0, False
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in (_PROC / str(member) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    seen = True
                    break
    return total if seen else None


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU time of these processes and their descendants.

    Descendants that have exited count too, once their parent has reaped
    them (PostgreSQL's backends end with their connections): the kernel adds
    a reaped child's time, its own and its reaped children's, to the
    parent's. Without it the figure for a span could fall below zero.
    """
    ticks = 0
    for pid in pids:
        for member in process_tree(pid):
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (_PROC / str(member) / "stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                # utime, stime, cutime, cstime: fields 14 to 17 of the line.
                ticks += sum(int(field) for field in fields[11:15])
    return ticks / _TICKS


async def settle(
    pids: Iterable[int],
    *,
    busy_below: float = 0.05,
    window: float = 0.25,
    timeout: float = 10.0,
) -> float:
    """Wait until these processes use under ``busy_below`` of a core.

    Returns the seconds waited; gives up after ``timeout``.
    """
    members = list(pids)
    started = time.monotonic()
    before = cpu_seconds(members)
    while time.monotonic() - started < timeout:
        await asyncio.sleep(window)
        after = cpu_seconds(members)
        if after - before < busy_below * window:
            break
        before = after
    return time.monotonic() - started
