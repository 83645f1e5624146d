"""The README's run command: ``scripts/run`` as a developer runs it.

It serves the gateway and, with CHANNEL_ID and DISCORD_TOKEN set, runs the
poller beside it in the same terminal; one Ctrl-C (SIGINT to the foreground
process group) stops both. Discord is a closed port: the poller keeps retrying.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testkit.servers import REPO_ROOT, ManagedProcess, free_port, wait_for_http

pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(
        not Path("/proc/self/stat").exists(), reason="reads the process tree in /proc"
    ),
    pytest.mark.skipif(
        not (REPO_ROOT / ".venv" / "bin" / "python").exists(),
        reason="scripts/run uses the project's .venv; the test suite makes none",
    ),
]

# The first run in a checkout may still install requirements.txt.
STARTUP_SECONDS = 90.0
STOP_SECONDS = 10.0


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``, with its command line."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name is in brackets and may hold spaces.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = command_line(child)
                todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class LocalStack:
    """``scripts/run`` in a process group of its own, as in a terminal."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.port = free_port()
        settings_file = tmp_path / "settings.json"
        settings_file.write_text("{}")
        self.process = ManagedProcess(
            [str(REPO_ROOT / "scripts" / "run")],
            cwd=REPO_ROOT,
            name="scripts-run",
            env={
                "PORT": str(self.port),
                "SETTINGS_FILE": str(settings_file),
                "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                # Empty is unset: the embedded default, whatever the test stack.
                "REDIS_URL": "",
                "QUEUE_BACKEND": "",
                "CHANNEL_LAYER": "",
                "CHANNEL_ID": "",
                "DISCORD_TOKEN": "",
                "SERVICE_BASE_URL": "",
                **env,
            },
        )
        self.seen: dict[int, str] = {}

    def start(self) -> None:
        self.process.start()
        url = f"http://127.0.0.1:{self.port}/healthz"
        wait_for_http(url, STARTUP_SECONDS, process=self.process)

    def children(self) -> dict[int, str]:
        """The processes below scripts/run now, remembered for the clean-up."""
        assert self.process.pid is not None
        found = descendants(self.process.pid)
        self.seen.update(found)
        return found

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the whole group; return the exit code."""
        assert self.process.pid is not None
        os.killpg(self.process.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_SECONDS
        while (code := self.process.returncode) is None:
            assert time.monotonic() < deadline, "still running after Ctrl-C"
            time.sleep(0.05)
        return code

    def close(self) -> None:
        # honcho's children live in sessions of their own: a failed test must
        # not leave them behind.
        if self.process.running:
            self.children()
        for pid in self.seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.process.close()


@pytest.fixture
def run_stack(tmp_path: Path) -> Iterator[Callable[..., LocalStack]]:
    """``run_stack(**env)`` starts scripts/run and waits for /healthz."""
    stacks: list[LocalStack] = []

    def start(**env: str) -> LocalStack:
        stack = LocalStack(tmp_path, **env)
        stacks.append(stack)
        stack.start()
        return stack

    yield start
    for stack in stacks:
        stack.close()


def pids_running(children: dict[int, str], marker: str) -> list[int]:
    """The programs whose command line holds ``marker``, not the shells around them."""
    return [
        pid
        for pid, command in children.items()
        if marker in command and not command.startswith(("/bin/sh ", "sh "))
    ]


@pytest.mark.timeout(STARTUP_SECONDS + 60)
def test_one_command_runs_gateway_and_poller_and_one_ctrl_c_stops_both(
    run_stack: Callable[..., LocalStack],
) -> None:
    stack = run_stack(
        CHANNEL_ID="1390012345678901234",
        DISCORD_TOKEN="Bot not-a-real-token",
        DISCORD_API_BASE=f"http://127.0.0.1:{free_port()}/api/v10",
    )
    stack.process.wait_for_output("polling channel(s) 1390012345678901234", 30)
    children = stack.children()
    (gateway,) = pids_running(children, "daphne")
    (poller,) = pids_running(children, "manage.py runpoller")
    # manage.py serve opened the port and runs daphne in its own place.
    assert "-m daphne --fd " in children[gateway]

    # 130 is honcho's answer to SIGINT; had either process exited first, the
    # code would be that process's.
    assert stack.interrupt() == 130
    assert not alive(gateway) and not alive(poller)
    # Both stopped on the SIGTERM honcho passed on, none needed a SIGKILL.
    assert "sending SIGKILL" not in stack.process.output()
    # A second run skips pip: the marker holds what was installed.
    requirements = (REPO_ROOT / "requirements.txt").read_bytes()
    marker = REPO_ROOT / ".venv" / ".requirements.sha256"
    assert marker.read_text().strip() == hashlib.sha256(requirements).hexdigest()


@pytest.mark.timeout(STARTUP_SECONDS + 60)
def test_without_discord_settings_only_the_gateway_runs(
    run_stack: Callable[..., LocalStack],
) -> None:
    stack = run_stack()
    assert "Discord poller: off" in stack.process.output()
    children = stack.children()
    assert len(pids_running(children, "daphne")) == 1
    assert pids_running(children, "runpoller") == []
    assert stack.interrupt() == 130
    assert not any(alive(pid) for pid in children)


# --- A port in use --------------------------------------------------------------

DAPHNE = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p"]


def run_once(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``scripts/run`` on a scratch settings file and database, until it exits."""
    settings_file = tmp_path / "settings.json"
    settings_file.write_text("{}")
    return subprocess.run(
        [str(REPO_ROOT / "scripts" / "run")],
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "PORT": str(free_port()),
            "SETTINGS_FILE": str(settings_file),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
            "REDIS_URL": "",
            "QUEUE_BACKEND": "",
            "CHANNEL_LAYER": "",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=STARTUP_SECONDS,
        check=False,
    )


def test_a_port_in_use_is_one_line_naming_it_and_port_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_once(tmp_path, PORT=str(port))
    assert result.returncode == 1
    assert result.stdout == ""  # no banner promising a gateway that never came
    assert result.stderr.splitlines() == [
        f"Port {port} on 127.0.0.1 is taken (Address already in use), perhaps by "
        f"another scripts/run: stop that, or run on another port with "
        f"PORT={port + 1} scripts/run"
    ]
    # It stopped before touching anything: not even the database was made.
    assert not (tmp_path / "db.sqlite3").exists()


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"JOB_TTL_SECONDS": "abc"},
            "Refusing to start: JOB_TTL_SECONDS must be a whole number from 1 to "
            "86400, not 'abc'.",
        ),
        (
            {"SETTINGS_FILE": "missing.json"},
            f"Refusing to start: SETTINGS_FILE {str(REPO_ROOT / 'missing.json')!r} "
            "does not exist.",
        ),
        (
            {"PORT": "eighty"},
            "Refusing to start: PORT must be a whole number from 1 to 65535, "
            "not 'eighty'.",
        ),
    ],
)
def test_a_bad_setting_stops_scripts_run_in_one_line(
    tmp_path: Path, env: dict[str, str], line: str
) -> None:
    result = run_once(tmp_path, **env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [line]


def test_daphne_on_a_port_in_use_says_how_to_pick_another() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*DAPHNE, str(port), "gateway_project.asgi:application"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if "CRITICAL" in line]
    assert f"Couldn't listen on 127.0.0.1:{port}" in line
    assert f"(PORT={port + 1} scripts/run, or daphne -p {port + 1})" in line
