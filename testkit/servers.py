"""Real throwaway servers for the test suite and the benchmarks.

Redis, PostgreSQL and daphne run as child processes on free loopback ports, with
their data in temporary directories. Everything here is free of Django and
pytest so that benchmarks can import it too; fixtures wrap it in conftest.py.

Children are killed and temporary files removed on ``close()``, on leaving a
``with`` block and, as a last resort, at interpreter exit. On Linux a child
started from the main thread also receives SIGKILL if the test run dies
without running its exit handlers (SIGKILL, ``os._exit``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

__all__ = [
    "LOOPBACK",
    "REPO_ROOT",
    "DaphneProcess",
    "ManagedProcess",
    "PostgresServer",
    "ProcessExitedError",
    "RedisServer",
    "ServerError",
    "free_port",
    "wait_for_http",
    "wait_for_port",
]

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent

_POLL_INTERVAL = 0.02
_OUTPUT_TAIL = 8000
_PORT_ATTEMPTS = 3
_ADDRESS_IN_USE = "Address already in use"


class ServerError(RuntimeError):
    """A throwaway server could not be started or did not become ready."""


class ProcessExitedError(ServerError):
    """A child process exited while we were waiting for it."""

    def __init__(self, name: str, returncode: int, output: str) -> None:
        super().__init__(
            f"{name} exited with code {returncode} before it was ready; "
            f"its output:\n{_tail(output)}"
        )
        self.name = name
        self.returncode = returncode
        self.output = output


# --- Clean-up of everything still open at exit ---------------------------------


class _Closeable(Protocol):
    def close(self) -> None: ...


_open: set[_Closeable] = set()
_open_lock = threading.Lock()


def _register(resource: _Closeable) -> None:
    with _open_lock:
        _open.add(resource)


def _unregister(resource: _Closeable) -> None:
    with _open_lock:
        _open.discard(resource)


@atexit.register
def _close_all() -> None:
    """Stop every child and remove every temporary directory still open."""
    with _open_lock:
        resources = list(_open)
    for resource in resources:
        # One failing clean-up must not leave the other children running.
        with contextlib.suppress(Exception):
            resource.close()


# --- Ports and readiness probes ------------------------------------------------


def free_port() -> int:
    """Return a TCP port on the loopback address that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(text: str) -> str:
    if len(text) <= _OUTPUT_TAIL:
        return text
    return "[...]\n" + text[-_OUTPUT_TAIL:]


def _poll(
    check: Callable[[], str | None],
    timeout: float,
    what: str,
    process: ManagedProcess | None,
) -> None:
    """Call ``check`` until it returns None; it returns why it is not ready yet."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None:
            process.raise_if_exited()
        problem = check()
        if problem is None:
            return
        if time.monotonic() >= deadline:
            message = f"{what} was not ready within {timeout:g}s ({problem})"
            if process is not None:
                message += f"; output of {process.name}:\n{_tail(process.output())}"
            raise ServerError(message)
        time.sleep(_POLL_INTERVAL)


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    *,
    process: ManagedProcess | None = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Raises ProcessExitedError at once if ``process`` exits in the meantime.
    """

    def check() -> str | None:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return None
        except OSError as exc:
            return str(exc)

    _poll(check, timeout, f"{host}:{port}", process)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # The probe reports the status the server sent, not where it points.
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


# Loopback must never go through a proxy configured in the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)


def wait_for_http(
    url: str,
    timeout: float = 10.0,
    expect_status: int = 200,
    *,
    process: ManagedProcess | None = None,
) -> None:
    """Wait until a GET of ``url`` answers with ``expect_status``.

    Raises ProcessExitedError at once if ``process`` exits in the meantime.
    """

    def check() -> str | None:
        try:
            with _opener.open(url, timeout=2.0) as response:
                status: int = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
        except (OSError, http.client.HTTPException) as exc:
            return str(exc)
        return None if status == expect_status else f"HTTP {status}"

    _poll(check, timeout, url, process)


def _retry_port_clash(
    start_once: Callable[[], None], pick_new_port: Callable[[], None] | None
) -> None:
    """Start, moving to another port if someone took ours since free_port()."""
    for attempt in range(_PORT_ATTEMPTS):
        try:
            start_once()
            return
        except ProcessExitedError as exc:
            last = attempt == _PORT_ATTEMPTS - 1
            if pick_new_port is None or last or _ADDRESS_IN_USE not in exc.output:
                raise
            pick_new_port()


# --- A child process with a log ------------------------------------------------


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """Return a pre-exec hook asking Linux to SIGKILL the child when we die."""
    # The kernel sends the signal when the *thread* that forked exits, so only
    # the main thread, which lives as long as the process, may use it.
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def _ids(user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    """The uid, gid and (no) extra groups with which to run a child as ``user``."""
    if user is None:
        return None, None, None
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid, []


class ManagedProcess:
    """A child process with its output in a log file and a readiness check.

    ``start()`` spawns the child in its own process group, then runs
    ``wait_ready()``, which calls ``ready(self)`` if given; subclasses may
    override it instead. ``env`` is merged over ``os.environ``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
        ready: Callable[[ManagedProcess], None] | None = None,
        stop_signal: int = signal.SIGTERM,
        user: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env or {})
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self.ready = ready
        self.stop_signal = stop_signal
        self.user = user
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._run_offset = 0

    # Lifecycle

    def start(self) -> None:
        """Spawn the child and wait until it is ready; kill it if it never is."""
        if self.running:
            raise ServerError(f"{self.name} is already running")
        self._spawn()
        try:
            self.wait_ready()
        except BaseException:
            self.kill()  # a half-started child must not outlive the failure
            raise

    def wait_ready(self) -> None:
        """Block until the child is ready to serve (by default: ``ready(self)``)."""
        if self.ready is not None:
            self.ready(self)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Send ``stop_signal``, SIGKILL after ``timeout``; return the exit code."""
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(self.stop_signal)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                popen.wait()
        # Grandchildren (e.g. PostgreSQL backends) must not outlive the leader.
        self._signal_group(signal.SIGKILL)
        return popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the child and its process group, like a crash; return the code."""
        popen = self._popen
        if popen is None:
            return None
        self._signal_group(signal.SIGKILL)
        return popen.wait()

    def restart(self) -> None:
        """Stop (if running) and start again with the same arguments."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the child and delete its log."""
        self.stop()
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None
        _unregister(self)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # State

    @property
    def pid(self) -> int | None:
        """The child's process id, once started."""
        return None if self._popen is None else self._popen.pid

    @property
    def running(self) -> bool:
        """True while the child has not exited."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while running or before the first start."""
        return None if self._popen is None else self._popen.poll()

    @property
    def log_path(self) -> Path | None:
        """The file holding the child's stdout and stderr, once started."""
        return self._log_path

    def output(self, *, current_run: bool = False) -> str:
        """The child's stdout and stderr so far, of every run or the latest only."""
        if self._log_path is None:
            return ""
        try:
            with self._log_path.open("rb") as log:
                if current_run:
                    log.seek(self._run_offset)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def raise_if_exited(self) -> None:
        """Raise ProcessExitedError if the child has exited."""
        code = self.returncode
        if code is not None:
            raise ProcessExitedError(self.name, code, self.output(current_run=True))

    def wait_for_output(self, text: str, timeout: float = 10.0) -> None:
        """Wait until the latest run has written ``text`` to its output."""

        def check() -> str | None:
            found = text in self.output(current_run=True)
            return None if found else f"{text!r} not in output yet"

        _poll(check, timeout, f"{self.name} output", self)

    # Internals

    def _spawn(self) -> None:
        if self._log_path is None:
            fd, path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
            os.close(fd)
            self._log_path = Path(path)
        _register(self)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        uid, gid, groups = _ids(self.user)
        # Restarts append, so a failure message can show what happened before.
        with self._log_path.open("ab") as log:
            log.write(f"--- start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._run_offset = log.tell()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=env,
                # Its own group: kill() reaches grandchildren, and a Ctrl-C in
                # the terminal does not stop servers before their clients.
                start_new_session=True,
                # The hook only calls prctl, which is safe after fork.
                preexec_fn=_die_with_parent(),
                user=uid,
                group=gid,
                extra_groups=groups,
            )

    def _signal_group(self, signum: int) -> None:
        if self._popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signum)


# --- Servers -------------------------------------------------------------------


def _make_temp_dir(prefix: str, base_dir: str | None) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir))


class _Server:
    """Shared lifecycle of a server that owns a temporary directory."""

    name = "server"

    def __init__(self, port: int | None, startup_timeout: float) -> None:
        self.port = port if port is not None else free_port()
        self.startup_timeout = startup_timeout
        self.process: ManagedProcess | None = None
        self._port_fixed = port is not None
        self._started = False
        self._temp_dir: Path | None = None

    def start(self) -> None:
        """Start the server and wait until it answers; restarts keep the port."""
        if self.process is not None and self.process.running:
            raise ServerError(f"{self.name} is already running")
        may_move = not (self._port_fixed or self._started)
        _retry_port_clash(self._start_once, self._pick_new_port if may_move else None)
        self._started = True

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down cleanly, keeping its data for a restart."""
        if self.process is not None:
            self.process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the server, like a crash."""
        if self.process is not None:
            self.process.kill()

    def restart(self) -> None:
        """Stop (if running) and start again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its temporary files."""
        if self.process is not None:
            self.process.close()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
        _unregister(self)

    def output(self) -> str:
        """The server's log so far."""
        return "" if self.process is None else self.process.output()

    @property
    def running(self) -> bool:
        """True while the server process has not exited."""
        return self.process is not None and self.process.running

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _temp(self, base_dir: str | None = None) -> Path:
        if self._temp_dir is None:
            self._temp_dir = _make_temp_dir(f"{self.name}-", base_dir)
            _register(self)
        return self._temp_dir

    def _pick_new_port(self) -> None:
        self.port = free_port()

    def _start_once(self) -> None:
        raise NotImplementedError


class RedisServer(_Server):
    """``redis-server`` on a free loopback port, without persistence.

    A restart comes back empty: nothing is saved to disk, unless ``extra_args``
    turn persistence on (``APPEND_ONLY`` keeps every write in the append-only
    file in the server's directory, which a restart replays).
    """

    name = "redis"
    APPEND_ONLY: tuple[str, ...] = ("--appendonly", "yes", "--appendfsync", "everysec")

    def __init__(
        self,
        port: int | None = None,
        *,
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(port, startup_timeout)
        # After the defaults, so they win (redis-server takes the last value).
        self.extra_args = list(extra_args)

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why Redis cannot run here, or None if it can."""
        if shutil.which("redis-server") is None:
            return "redis-server is not installed (not found on PATH)"
        return None

    @classmethod
    def available(cls) -> bool:
        """True if ``redis-server`` can be run."""
        return cls.unavailable_reason() is None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of database 0."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _start_once(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerError(self.unavailable_reason())
        argv = [
            binary,
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self._temp()),
            "--logfile", "",
            *self.extra_args,
        ]  # fmt: skip
        if self.process is None:
            self.process = ManagedProcess(argv, name=self.name)
        self.process.argv = argv
        self.process.ready = self._wait_ready
        self.process.start()

    def _wait_ready(self, process: ManagedProcess) -> None:
        def check() -> str | None:
            try:
                with socket.create_connection((LOOPBACK, self.port), 1.0) as sock:
                    sock.sendall(b"PING\r\n")
                    reply = sock.recv(64)
            except OSError as exc:
                return str(exc)
            # Redis answers -LOADING or an error until it can serve commands.
            return None if reply.startswith(b"+PONG") else repr(reply)

        _poll(check, self.startup_timeout, self.url, process)


class PostgresServer(_Server):
    """A PostgreSQL cluster in a temporary directory, tuned for speed.

    The cluster is created by the first ``start()`` and kept until ``close()``;
    restarts reuse it, so data survives ``stop()`` and, as committed
    transactions are in the kernel's cache, ``kill()`` too. Running as root,
    the server runs as the ``postgres`` system user, which initdb requires.
    """

    name = "postgres"
    system_user = "postgres"

    def __init__(
        self,
        port: int | None = None,
        *,
        base_dir: str | None = None,
        settings: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        super().__init__(port, startup_timeout)
        self.base_dir = base_dir
        # fsync and full-page writes only matter if the machine crashes; commits
        # stay synchronous (nearly free without fsync) so kill() loses nothing.
        self.settings = {
            "listen_addresses": LOOPBACK,
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            **(settings or {}),
        }
        self._data_dir: Path | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why PostgreSQL cannot run here, or None if it can."""
        for binary in ("initdb", "postgres"):
            if shutil.which(binary) is None:
                return f"PostgreSQL's {binary} is not installed (not found on PATH)"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(cls.system_user)
            except KeyError:
                return f"running as root and there is no {cls.system_user!r} user"
        return None

    @classmethod
    def available(cls) -> bool:
        """True if a PostgreSQL cluster can be created and run."""
        return cls.unavailable_reason() is None

    @property
    def url(self) -> str:
        """The URL of the ``postgres`` database as the ``postgres`` superuser."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on this server."""
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{name}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        import psycopg  # imported late: only needed by callers that create DBs
        from psycopg import sql

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, disconnecting its sessions."""
        import psycopg
        from psycopg import sql

        query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(query.format(sql.Identifier(name)))

    def close(self) -> None:
        """Stop the server and delete its cluster; a later start() runs initdb."""
        super().close()
        self._data_dir = None

    @property
    def _run_as(self) -> str | None:
        return self.system_user if os.geteuid() == 0 else None

    def _start_once(self) -> None:
        if self._data_dir is None:
            self._data_dir = self._initdb()
        data_dir = self._data_dir
        argv = [
            _which("postgres"),
            "-D", str(data_dir),
            "-p", str(self.port),
            "-k", str(data_dir.parent / "sockets"),
        ]  # fmt: skip
        for key, value in self.settings.items():
            argv += ["-c", f"{key}={value}"]
        if self.process is None:
            self.process = ManagedProcess(
                argv,
                name=self.name,
                cwd=data_dir.parent,
                # SIGINT is the fast shutdown; SIGTERM would wait for clients.
                stop_signal=signal.SIGINT,
                user=self._run_as,
            )
        self.process.argv = argv
        self.process.ready = self._wait_ready
        self.process.start()

    def _initdb(self) -> Path:
        reason = self.unavailable_reason()
        if reason is not None:
            raise ServerError(reason)
        base = self._temp(self.base_dir)
        data_dir, socket_dir = base / "data", base / "sockets"
        data_dir.mkdir()
        socket_dir.mkdir()
        uid, gid, groups = _ids(self._run_as)
        if uid is not None and gid is not None:
            # The system user must reach its directories through ours.
            base.chmod(0o755)
            _check_traversable(base)
            for path in (data_dir, socket_dir):
                os.chown(path, uid, gid)
        argv = [
            _which("initdb"),
            "-D", str(data_dir),
            "-A", "trust",
            "-U", "postgres",
            "-E", "UTF8",
            "--no-locale",
            "--no-sync",
        ]  # fmt: skip
        result = subprocess.run(
            argv,
            cwd=base,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            user=uid,
            group=gid,
            extra_groups=groups,
        )
        if result.returncode != 0:
            output = result.stdout.decode("utf-8", errors="replace")
            raise ServerError(f"initdb failed with code {result.returncode}:\n{output}")
        return data_dir

    def _wait_ready(self, process: ManagedProcess) -> None:
        assert self._data_dir is not None
        pid_file = self._data_dir / "postmaster.pid"

        def check() -> str | None:
            # pg_ctl's own test: the postmaster writes "ready" into its pid file
            # once it accepts connections. A killed server leaves a stale file,
            # hence the pid comparison.
            try:
                lines = pid_file.read_text().splitlines()
            except FileNotFoundError:
                return "no postmaster.pid yet"
            if len(lines) < 8 or lines[0] != str(process.pid):
                return "postmaster.pid not written yet"
            status = lines[7].strip()
            return None if status == "ready" else f"status {status!r}"

        _poll(check, self.startup_timeout, self.url, process)


def _which(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise ServerError(f"{binary} not found on PATH")
    return path


def _check_traversable(path: Path) -> None:
    """Fail clearly if another user cannot reach ``path`` through its parents."""
    for parent in path.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise ServerError(
                f"{parent} is not searchable by other users, so PostgreSQL cannot "
                f"reach its data under {path}; pass another base_dir"
            )


class DaphneProcess(ManagedProcess):
    """daphne serving the gateway (or another ASGI app) on a free loopback port.

    ``start()`` returns once ``GET health_path`` answers 200.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        application: str = "gateway_project.asgi:application",
        cwd: str | os.PathLike[str] = REPO_ROOT,
        health_path: str = "/healthz",
        startup_timeout: float = 30.0,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.extra_args = list(extra_args)
        self.application = application
        self.health_path = health_path
        self.startup_timeout = startup_timeout
        self._port_fixed = port is not None
        self._started = False
        super().__init__(self._argv(), env=env, cwd=cwd, name="daphne")

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:PORT``, without a path."""
        return f"ws://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        """Start daphne and wait for its health check; restarts keep the port."""
        may_move = not (self._port_fixed or self._started)
        _retry_port_clash(self._start_once, self._pick_new_port if may_move else None)
        self._started = True

    def wait_ready(self) -> None:
        """Block until the health check answers 200."""
        url = self.base_url + self.health_path
        wait_for_http(url, self.startup_timeout, process=self)

    def _start_once(self) -> None:
        self.argv = self._argv()
        super().start()

    def _pick_new_port(self) -> None:
        self.port = free_port()

    def _argv(self) -> list[str]:
        return [
            sys.executable, "-m", "daphne",
            "-b", LOOPBACK,
            "-p", str(self.port),
            *self.extra_args,
            self.application,
        ]  # fmt: skip
