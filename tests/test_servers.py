"""The throwaway servers start, answer, restart, fail clearly and clean up."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from testkit import servers
from testkit.servers import (
    LOOPBACK,
    REPO_ROOT,
    DaphneProcess,
    ManagedProcess,
    PostgresServer,
    ProcessExitedError,
    RedisServer,
    ServerError,
    free_port,
    wait_for_http,
    wait_for_port,
)

pytestmark = pytest.mark.processes

needs_redis = pytest.mark.skipif(
    not RedisServer.available(), reason=str(RedisServer.unavailable_reason())
)
needs_postgres = pytest.mark.skipif(
    not PostgresServer.available(), reason=str(PostgresServer.unavailable_reason())
)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((LOOPBACK, port)) == 0


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """One cluster for the module: initdb is the slow part."""
    with PostgresServer() as server:
        yield server


def test_free_port_is_bindable() -> None:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, free_port()))


@needs_redis
def test_redis_serves_and_comes_back_empty_after_kill() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.set("key", "value")
        assert client.get("key") == b"value"
        port = server.port

        server.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.restart()

        assert server.port == port
        assert client.get("key") is None  # nothing is persisted
        client.close()
        temp_dir = server._temp_dir
    assert temp_dir is not None
    assert not temp_dir.exists()
    assert not _port_open(port)


@needs_redis
def test_redis_moves_to_another_port_when_its_port_was_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken, free_port()])
        monkeypatch.setattr(servers, "free_port", lambda: next(ports))

        with RedisServer() as server:
            assert server.port != taken
            assert redis.Redis.from_url(server.url).ping()

        with pytest.raises(ProcessExitedError, match="Address already in use"):
            RedisServer(port=taken).start()


@needs_postgres
def test_postgres_keeps_committed_data_across_kill_and_stop(
    postgres: PostgresServer,
) -> None:
    url = postgres.create_database("servers_test")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")

    postgres.kill()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2).close()
    postgres.start()
    postgres.restart()

    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    postgres.drop_database("servers_test")


@needs_postgres
def test_postgres_listens_on_loopback_only(postgres: PostgresServer) -> None:
    with psycopg.connect(postgres.url) as conn:
        row = conn.execute("SHOW listen_addresses").fetchone()
    assert row == (LOOPBACK,)


def test_managed_process_serves_http_and_captures_output() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "http.server", "-b", LOOPBACK, str(port)]
    url = f"http://{LOOPBACK}:{port}/"
    with ManagedProcess(
        argv, cwd=REPO_ROOT, ready=lambda p: wait_for_http(url, 10, process=p)
    ) as process:
        wait_for_http(url + "missing", 1, expect_status=404)
        process.restart()
        wait_for_http(url, 1)
        log_path = process.log_path
        assert log_path is not None
    assert not process.running
    assert not log_path.exists()


def test_early_exit_raises_with_the_output() -> None:
    code = "print('boom'); raise SystemExit(3)"
    process = ManagedProcess(
        [sys.executable, "-c", code],
        ready=lambda p: wait_for_port(LOOPBACK, free_port(), 10, process=p),
    )
    with pytest.raises(ProcessExitedError, match="boom") as caught:
        process.start()
    assert caught.value.returncode == 3
    process.close()


def test_timeout_names_what_and_kills_the_child() -> None:
    code = "print('waiting', flush=True); import time; time.sleep(60)"
    process = ManagedProcess(
        [sys.executable, "-c", code],
        ready=lambda p: wait_for_port(LOOPBACK, free_port(), 0.3, process=p),
    )
    with pytest.raises(ServerError, match=r"(?s)not ready within 0\.3s.*waiting"):
        process.start()
    assert not process.running
    process.close()


def test_daphne_process_starts_an_asgi_app(tmp_path: Path) -> None:
    (tmp_path / "tiny_app.py").write_text(
        textwrap.dedent("""
            import os

            async def application(scope, receive, send):
                status = 200 if scope["path"] == "/healthz" else 404
                body = os.environ["GREETING"].encode()
                await send({"type": "http.response.start", "status": status})
                await send({"type": "http.response.body", "body": body})
        """)
    )
    daphne = DaphneProcess(
        application="tiny_app:application", cwd=tmp_path, env={"GREETING": "hi"}
    )
    with daphne:
        assert daphne.ws_url == f"ws://{LOOPBACK}:{daphne.port}"
        wait_for_http(daphne.base_url + "/other", 1, expect_status=404)
        daphne.kill()
        daphne.restart()
        wait_for_http(daphne.base_url + "/healthz", 1)
    assert not daphne.running


@needs_redis
def test_children_die_with_a_killed_parent() -> None:
    script = (
        "from testkit.servers import RedisServer; import time; "
        "server = RedisServer(); server.start(); "
        "print(server.port, server._temp_dir, server.process.log_path, flush=True); "
        "time.sleep(60)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE
    )
    assert parent.stdout is not None
    port, temp_dir, log_path = parent.stdout.readline().decode().split()
    assert _port_open(int(port))

    parent.kill()  # no atexit handlers run
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 5
    while _port_open(int(port)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _port_open(int(port))
    # Files are the price of a killed parent; only the children are guarded.
    shutil.rmtree(temp_dir)
    Path(log_path).unlink()
