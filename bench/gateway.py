"""The gateway under daphne, on a database and a queue backend of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import API_KEY, DJANGO_SECRET_KEY, HMAC_SECRET, REPO_ROOT
from testkit.servers import LOOPBACK, DaphneProcess, PostgresServer

_MIGRATE_TIMEOUT = 180.0


class Gateway:
    """A migrated database, then daphne serving the gateway on it.

    ``database_url`` None means a fresh SQLite file in a temporary folder. With
    ``redis_url`` the queue, channel layer and wake-ups use Redis
    (``QUEUE_BACKEND=redis``); without it everything stays in the process.
    With ``processes`` it is served by ``manage.py serve``: that many daphne
    processes on one port (they need ``redis_url`` to share the jobs).
    """

    def __init__(
        self,
        *,
        database_url: str | None = None,
        redis_url: str | None = None,
        access_log: bool = True,
        application: str = "gateway_project.asgi:application",
        extra_env: dict[str, str] | None = None,
        source: Path = REPO_ROOT,
        processes: int | None = None,
    ) -> None:
        self.processes = processes
        self.application = application
        # The checkout served: another commit's, to compare before and after.
        self.source = source
        self.extra_env = dict(extra_env or {})
        self._scratch = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
        (self._scratch / "settings.json").write_text("{}")
        self.database_url = database_url or f"sqlite:///{self._scratch / 'db.sqlite3'}"
        self.redis_url = redis_url
        self.access_log = access_log
        self.process: DaphneProcess | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` once started."""
        if self.process is None:
            raise RuntimeError("the gateway is not started")
        return self.process.base_url

    @property
    def pid(self) -> int | None:
        """daphne's (or the launcher's) process id, once started."""
        return None if self.process is None else self.process.pid

    def env(self) -> dict[str, str]:
        """The gateway's whole configuration; nothing leaks in from the shell."""
        return {
            "SETTINGS_FILE": str(self._scratch / "settings.json"),
            "API_KEY": API_KEY,
            "HMAC_SECRET": HMAC_SECRET,
            "DJANGO_SECRET_KEY": DJANGO_SECRET_KEY,
            "DEBUG": "false",
            "DATABASE_URL": self.database_url,
            # Empty means unset: the embedded (single-process) stack.
            "REDIS_URL": self.redis_url or "",
            "QUEUE_BACKEND": "redis" if self.redis_url else "database",
            "CHANNEL_LAYER": "",
            "CHANNEL_ID": "",
            "DISCORD_TOKEN": "",
            "RATE_LIMIT_PER_MINUTE": "0",
            "TRUSTED_PROXY_COUNT": "0",
            "TIMESTAMP_TOLERANCE": "60",
            "DEDUP_WINDOW_SECONDS": "60",
            # Long enough that no job expires during a slow drain.
            "JOB_TTL_SECONDS": "3600",
            "LOG_LEVEL": "WARNING",
            **self.extra_env,
        }

    def start(self) -> None:
        """Migrate, then start daphne and wait for ``/healthz``."""
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
            cwd=self.source,
            env=_merged(self.env()),
            check=True,
            stdin=subprocess.DEVNULL,
            timeout=_MIGRATE_TIMEOUT,
        )
        # daphne's default verbosity writes an access log line per request, as
        # the production command in the README does; -v 0 turns it off.
        extra_args = [] if self.access_log else ["-v", "0"]
        options: dict[str, Any] = {
            "env": self.env(),
            "extra_args": extra_args,
            "application": self.application,
            "cwd": self.source,
        }
        self.process = (
            DaphneProcess(**options)
            if self.processes is None
            else ServeProcess(count=self.processes, **options)
        )
        self.process.start()

    def close(self) -> None:
        """Stop daphne and delete the scratch folder (and its SQLite file)."""
        if self.process is not None:
            self.process.close()
            self.process = None
        shutil.rmtree(self._scratch, ignore_errors=True)


class ServeProcess(DaphneProcess):
    """``manage.py serve`` with ``count`` daphne processes, in place of daphne."""

    def __init__(self, *, count: int, **options: Any) -> None:
        self.count = count  # before DaphneProcess builds the command line
        super().__init__(**options)

    def _argv(self) -> list[str]:
        return [
            sys.executable, "manage.py", "serve",
            "--processes", str(self.count),
            "--bind", LOOPBACK,
            "--port", str(self.port),
            "--", *self.extra_args,
        ]  # fmt: skip


def _merged(env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **env}


class PostgresDatabase:
    """A throwaway PostgreSQL server holding one database for one gateway."""

    def __init__(self, name: str = "bench") -> None:
        self.name = name
        self.server = PostgresServer()
        self.url = ""

    def start(self) -> str:
        """Start the server, create the database, return its URL."""
        self.server.start()
        self.url = self.server.create_database(self.name)
        return self.url

    def close(self) -> None:
        """Stop the server and delete its cluster."""
        self.server.close()
