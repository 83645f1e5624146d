"""The seed service (FastAPI + uvicorn), run as the yardstick.

It is not part of this repository: ``--baseline-dir`` or ``BENCH_BASELINE_DIR``
names its folder (the one with its ``app.py``), and without either the
benchmarks run the gateway alone. Its requirements are installed once into
``bench/.seed-venv`` (not committed) and reinstalled only when its
``requirements.txt`` changes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from bench.common import API_KEY, HMAC_SECRET, REPO_ROOT
from testkit.servers import LOOPBACK, ManagedProcess, free_port, wait_for_http

BASELINE_DIR_ENV = "BENCH_BASELINE_DIR"
VENV_DIR = REPO_ROOT / "bench" / ".seed-venv"
_STAMP = "requirements.sha256"
_INSTALL_TIMEOUT = 600.0


class BaselineUnavailableError(RuntimeError):
    """The seed service cannot be run here; the message says why."""


def find_baseline(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The seed's folder: ``explicit``, else the environment's."""
    chosen = explicit or os.environ.get(BASELINE_DIR_ENV)
    if not chosen:
        raise BaselineUnavailableError(
            f"no seed folder given; pass --baseline-dir or set {BASELINE_DIR_ENV}"
        )
    folder = Path(chosen).resolve()
    for needed in ("app.py", "requirements.txt"):
        if not (folder / needed).is_file():
            raise BaselineUnavailableError(
                f"no seed service at {folder} ({needed} missing); pass "
                f"--baseline-dir or set {BASELINE_DIR_ENV}"
            )
    return folder


def ensure_venv(seed_dir: Path, venv_dir: Path = VENV_DIR) -> Path:
    """Create or refresh the seed's virtualenv; return its Python."""
    requirements = seed_dir / "requirements.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    python = venv_dir / "bin" / "python"
    stamp = venv_dir / _STAMP
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    print(f"Installing the seed's requirements into {_shown(venv_dir)} (once)...")
    try:
        if not python.exists():
            _run([sys.executable, "-m", "venv", str(venv_dir)])
        _run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)])
    except (OSError, subprocess.SubprocessError) as exc:
        raise BaselineUnavailableError(
            f"could not install the seed's requirements: {exc}"
        ) from exc
    stamp.write_text(digest + "\n")
    return python


def _run(argv: list[str]) -> None:
    subprocess.run(
        argv,
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=_INSTALL_TIMEOUT,
    )


def _shown(path: Path) -> str:
    # Relative to the repository, so that no machine's layout ends up in a log.
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return path.name


class SeedProcess(ManagedProcess):
    """``uvicorn app:app`` from the seed's folder on a free loopback port.

    With ``redis_url`` it queues in Redis, else in memory. Ready once the signed
    ``/health`` refuses an unsigned probe (it has no unsigned endpoint).
    """

    def __init__(
        self,
        python: Path,
        seed_dir: Path,
        *,
        redis_url: str | None = None,
        access_log: bool = True,
        startup_timeout: float = 30.0,
    ) -> None:
        self.port = free_port()
        self.startup_timeout = startup_timeout
        argv = [
            str(python), "-m", "uvicorn", "app:app",
            "--host", LOOPBACK,
            "--port", str(self.port),
        ]  # fmt: skip
        if not access_log:
            argv.append("--no-access-log")
        super().__init__(argv, env=_seed_env(redis_url), cwd=seed_dir, name="seed")

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash."""
        return f"http://{LOOPBACK}:{self.port}"

    def wait_ready(self) -> None:
        """Block until the app answers (401: it is up and checking signatures)."""
        wait_for_http(
            self.base_url + "/health",
            self.startup_timeout,
            expect_status=401,
            process=self,
        )


def _seed_env(redis_url: str | None) -> Mapping[str, str]:
    return {
        "API_KEY": API_KEY,
        "HMAC_SECRET": HMAC_SECRET,
        # Empty values mean "unset" to the seed: no Redis, no poller, no limit.
        "REDIS_URL": redis_url or "",
        "CHANNEL_ID": "",
        "DISCORD_TOKEN": "",
        "RATE_LIMIT_PER_MINUTE": "0",
        "TIMESTAMP_TOLERANCE": "60",
        # The seed's folder is read-only; nothing to cache there.
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def add_baseline_arguments(parser: argparse.ArgumentParser) -> None:
    """The seed options every benchmark reads: see ``seed_factory``."""
    parser.add_argument(
        "--baseline-dir",
        help=f"the seed service's folder (default: {BASELINE_DIR_ENV}; "
        "without either, the gateway runs alone)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="run the gateway alone"
    )
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="servers write an access log line per request (and connection), as "
        "both run by default (default: on)",
    )


def seed_factory(
    args: argparse.Namespace,
) -> Callable[[str | None], SeedProcess] | None:
    """Starts the seed (on Redis, given a URL) for a benchmark's ``--baseline-dir``.

    None, said aloud, with ``--no-baseline`` or when the seed cannot be set up:
    the gateway then runs alone, without ratios.
    """
    if args.no_baseline:
        print("Baseline left out (--no-baseline): the gateway runs alone.")
        return None
    try:
        seed_dir = find_baseline(args.baseline_dir)
        python = ensure_venv(seed_dir)
    except BaselineUnavailableError as exc:
        print(f"Baseline unavailable: {exc}. The gateway runs alone, without ratios.")
        return None

    def start(redis_url: str | None) -> SeedProcess:
        return SeedProcess(
            python, seed_dir, redis_url=redis_url, access_log=args.access_log
        )

    return start
