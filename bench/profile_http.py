"""Where a server spends its time under signed ``GET /job/next`` load.

    python -m bench.profile_http                    # the gateway, database queue
    python -m bench.profile_http --backend redis    # the gateway, Redis queue
    python -m bench.profile_http --target seed      # the seed, for comparison

wrk loads one server while py-spy samples it, counting only the thread that
holds the GIL: for a single-process Python server that is where its CPU goes.
Prints the top functions by self and inclusive share, the share of each layer
of a request's life (server, thread hand-offs, app, queue), and the self share
by package. Needs ``py-spy`` (``pip install py-spy``) and wrk.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import load
from bench.baseline import SeedProcess, ensure_venv, find_baseline
from bench.common import RESULTS_DIR, Signer, format_table, machine_summary
from bench.gateway import Gateway
from testkit.servers import RedisServer

# "func (path/to/file.py:123)" as py-spy writes each frame of a raw stack.
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


@dataclass(frozen=True)
class Profile:
    """Collapsed stacks: each a tuple of (function, file) frames, with a count."""

    stacks: Counter[tuple[tuple[str, str], ...]]

    @property
    def samples(self) -> int:
        return sum(self.stacks.values())

    @classmethod
    def parse(cls, lines: Iterable[str]) -> Profile:
        """Read py-spy's ``--format raw`` output."""
        stacks: Counter[tuple[tuple[str, str], ...]] = Counter()
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            stacks[tuple(_frame(text) for text in stack.split(";"))] += int(count)
        return cls(stacks)

    def self_time(self) -> Counter[tuple[str, str]]:
        """Samples whose innermost frame is each function."""
        counts: Counter[tuple[str, str]] = Counter()
        for stack, count in self.stacks.items():
            counts[stack[-1]] += count
        return counts

    def inclusive_time(self) -> Counter[tuple[str, str]]:
        """Samples with each function anywhere on the stack (once per sample)."""
        counts: Counter[tuple[str, str]] = Counter()
        for stack, count in self.stacks.items():
            for frame in set(stack):
                counts[frame] += count
        return counts

    def by_layer(self) -> Counter[str]:
        """Samples by the layer of the request's life they belong to (LAYERS)."""
        counts: Counter[str] = Counter()
        for stack, count in self.stacks.items():
            counts[_layer(stack)] += count
        return counts

    def by_package(self) -> Counter[str]:
        """Self samples by top-level package (``asyncio``, ``django``...)."""
        counts: Counter[str] = Counter()
        for (_func, file), count in self.self_time().items():
            counts[_package(file)] += count
        return counts


# The first rule that matches a stack names its layer: function names, then
# file prefixes. Queue work runs in worker threads, so it is tested first.
LAYERS: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    (
        "queue and database work (ORM, SQLite, Redis), in worker threads",
        ("_claim_from_table", "_store", "_record_sync", "_count_queued"),
        (),
    ),
    (
        "thread hand-offs: executors started and joined, sync_to_async, signals",
        (
            "ThreadSensitiveContext",
            "Thread.start",
            "ThreadPoolExecutor",
            "_worker",
            "Thread._bootstrap",
            "Signal.asend",
            "SyncToAsync",
        ),
        (),
    ),
    (
        "the app: request, middleware, URL, view, response",
        ("ASGIHandler", "_http_router", "FastAPI", "Starlette", "APIRoute"),
        ("fastapi/", "starlette/", "jobs/", "gateway_project/", "app.py"),
    ),
    (
        "the server: HTTP parsing and writing, access log",
        (),
        ("twisted/", "daphne/", "uvicorn/", "httptools/", "h11/"),
    ),
]
OTHER_LAYER = "event loop and the rest"


def _layer(stack: tuple[tuple[str, str], ...]) -> str:
    for name, functions, files in LAYERS:
        for func, file in stack:
            if any(part in func for part in functions) or (
                files and file.startswith(files)
            ):
                return name
    return OTHER_LAYER


def _frame(text: str) -> tuple[str, str]:
    match = _FRAME.match(text)
    if match is None:
        return text or "(native)", ""
    return match["func"], match["file"]


def _package(file: str) -> str:
    if not file:
        return "(native / idle)"
    if file.startswith("<frozen"):
        return "(import machinery)"
    head = file.split("/", 1)[0]
    return head[:-3] if head.endswith(".py") else head


def top_table(counts: Counter[tuple[str, str]], total: int, limit: int) -> str:
    rows = [
        [f"{100 * count / total:.1f}%", func, file]
        for (func, file), count in counts.most_common(limit)
    ]
    return format_table(["share", "function", "file"], rows)


def share_table(counts: Counter[str], total: int, what: str) -> str:
    rows = [
        [f"{100 * count / total:.1f}%", name]
        for name, count in counts.most_common()
        if count / total >= 0.005
    ]
    return format_table(["share", what], rows)


# --- Running ----------------------------------------------------------------


def record(
    pid: int, base_url: str, *, duration: float, rate: int, out: Path
) -> load.WrkResult:
    """Run wrk on ``base_url`` while py-spy samples ``pid`` into ``out``."""
    signer = Signer()
    load.run_wrk(base_url, signer.headers(), duration=2.0)  # warm-up
    spy = subprocess.Popen(
        [
            _py_spy(), "record",
            "--pid", str(pid),
            "--duration", str(int(duration)),
            "--rate", str(rate),
            "--format", "raw",
            "--gil",
            "--nonblocking",
            "--output", str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)  # py-spy attaches before the load starts
        result = load.run_wrk(base_url, signer.headers(), duration=duration)
        output, _ = spy.communicate(timeout=duration + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}):\n{output}")
    return result


def _py_spy() -> str:
    # Installed into the virtualenv next to this interpreter, or on the PATH.
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return found


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_http")
    parser.add_argument("--target", choices=["gateway", "seed"], default="gateway")
    parser.add_argument(
        "--backend",
        choices=["database", "redis"],
        default="database",
        help="the gateway's queue backend; for the seed, database means in-memory",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    parser.add_argument("--baseline-dir", help="the seed service's folder")
    parser.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=True
    )
    parser.add_argument("--out", type=Path, help="where to keep py-spy's raw stacks")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 45:
        parser.error("--duration must be between 1 and 45 seconds")
    if not 1 <= args.rate <= 1000:
        parser.error("--rate must be between 1 and 1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if reason := load.wrk_available():
        raise SystemExit(reason)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or (
        RESULTS_DIR / f"profile-{args.target}-{args.backend}-{stamp}.txt"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    print(machine_summary())
    with contextlib.ExitStack() as stack:
        redis_url = None
        if args.backend == "redis":
            redis_server = stack.enter_context(RedisServer())
            redis_url = redis_server.url
        server: SeedProcess | Gateway
        if args.target == "seed":
            seed_dir = find_baseline(args.baseline_dir)
            server = SeedProcess(
                ensure_venv(seed_dir),
                seed_dir,
                redis_url=redis_url,
                access_log=args.access_log,
            )
        else:
            server = Gateway(redis_url=redis_url, access_log=args.access_log)
        stack.callback(server.close)
        server.start()
        assert server.pid is not None
        result = record(
            server.pid, server.base_url, duration=args.duration, rate=args.rate, out=out
        )
    profile = Profile.parse(out.read_text().splitlines())
    total = profile.samples
    queue = args.backend
    if args.target == "seed":
        queue = "Redis" if args.backend == "redis" else "in-memory"
    print(
        f"\n{args.target} ({queue} queue) under wrk: {result.rate:,.0f} req/s "
        f"while sampled; {total} samples holding the GIL, at {args.rate}/s.\n"
    )
    if not total:
        print("No samples: nothing held the GIL?")
        return 1
    print("Self time (innermost frame):")
    print(top_table(profile.self_time(), total, args.top))
    print("\nInclusive time (anywhere on the stack):")
    print(top_table(profile.inclusive_time(), total, args.top))
    print("\nBy layer:")
    print(share_table(profile.by_layer(), total, "layer"))
    print("\nSelf time by package:")
    print(share_table(profile.by_package(), total, "package"))
    print(f"\nRaw stacks kept in {out.name} (under bench/results).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
