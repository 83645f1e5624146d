"""Bodies over their limit are refused before they are read (gateway_project.server).

Through a real daphne, with a raw socket that keeps sending: the answer (or
the close) must come long before the 200 MB the client means to send.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from gateway_client import signing
from gateway_project.server import daphne_patches
from testkit.servers import LOOPBACK, REPO_ROOT, DaphneProcess
from tests.conftest import process_env
from tests.stack import API_KEY, HMAC_SECRET, STACK

pytestmark = [pytest.mark.backends, pytest.mark.processes]

Sign = Callable[..., dict[str, str]]

MAX_JOB_BYTES = 16384  # the default
ADMIN_LIMIT = 2_621_440  # DATA_UPLOAD_MAX_MEMORY_SIZE for that default
MEANT_TO_SEND = 200 * 1024 * 1024
# What the client may get into the connection before the server's answer: the
# kernel's buffers on both sides (a few MB on loopback), nothing like 200 MB.
FAR_LESS = 32 * 1024 * 1024
DEADLINE = 60.0  # generous: a shared machine; the answer comes in milliseconds


@pytest.fixture(scope="module")
def gateway(django_db_setup: None) -> Iterator[DaphneProcess]:
    with DaphneProcess(env=process_env()) as process:
        yield process


@pytest.fixture
def fresh(transactional_db: None, request: pytest.FixtureRequest) -> None:
    """Each test that stores a job starts on an empty store."""
    if STACK == "services":
        request.getfixturevalue("clean_redis")


@dataclass
class Outcome:
    sent: int  # body bytes the socket took
    received: bytes
    ended: str  # how the exchange ended: "answer", "closed", "reset", "deadline"

    @property
    def status(self) -> int:
        return int(self.received.split(b" ", 2)[1])

    @property
    def headers(self) -> dict[str, str]:
        head = self.received.partition(b"\r\n\r\n")[0].decode("latin-1")
        return dict(line.lower().split(": ", 1) for line in head.split("\r\n")[1:])

    @property
    def body(self) -> dict[str, str]:
        data: dict[str, str] = json.loads(self.received.partition(b"\r\n\r\n")[2])
        return data


def keep_sending(
    port: int, head: bytes, *, chunked: bool = False, total: int = MEANT_TO_SEND
) -> Outcome:
    """Send ``head``, then body bytes up to ``total`` while reading any answer.

    Stops once a whole answer is in (by its Content-Length), when the server
    closes or resets the connection, when all is sent, or at the deadline.
    """
    piece = b"x" * 65536
    frame = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
    received = b""
    sent = 0
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        deadline = time.monotonic() + DEADLINE
        while sent < total:
            if time.monotonic() > deadline:
                return Outcome(sent, received, "deadline")
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    return Outcome(sent, received, "reset")
                if not data:
                    return Outcome(sent, received, "closed")
                received += data
                if _whole(received):
                    return Outcome(sent, received, "answer")
            if writable:
                try:
                    sent += sock.send(frame)
                except (BrokenPipeError, ConnectionResetError):
                    return Outcome(sent, received + _rest(sock), "reset")
        return Outcome(sent, received + _rest(sock), "sent all")


def _whole(received: bytes) -> bool:
    head, found, body = received.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _rest(sock: socket.socket) -> bytes:
    """What the server sent before it closed, if the kernel kept it."""
    sock.setblocking(True)
    sock.settimeout(5)
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    except OSError:
        pass
    return received


def _post(path: str, headers: dict[str, str], length: int | None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {LOOPBACK}"]
    lines += ["Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_refused_unread(outcome: Outcome, limit: int = MAX_JOB_BYTES) -> None:
    assert outcome.ended != "deadline", outcome
    assert outcome.sent < FAR_LESS, outcome
    # The answer arrives before the close (which may come as a reset: what
    # the client kept sending is never read).
    assert outcome.status == 413, outcome.received
    assert outcome.body == {
        "error": "too_large",
        "detail": f"The body is over {limit} bytes.",
    }
    assert outcome.headers["content-type"] == "application/json"
    assert outcome.headers["connection"] == "close"
    assert outcome.headers["x-content-type-options"] == "nosniff"


def test_a_declared_length_over_the_limit_is_refused_unread(
    gateway: DaphneProcess, sign: Sign
) -> None:
    for headers in ({}, sign(), {**sign(), "Expect": "100-continue"}):
        outcome = keep_sending(gateway.port, _post("/job", headers, MEANT_TO_SEND))
        assert_refused_unread(outcome)
        # No "100 Continue" after the refusal: one answer, the 413.
        assert outcome.received.count(b"HTTP/1.1") == 1


def test_a_chunked_body_is_cut_off_at_the_limit(
    gateway: DaphneProcess, sign: Sign
) -> None:
    for headers in ({}, sign()):
        outcome = keep_sending(gateway.port, _post("/job", headers, None), chunked=True)
        assert_refused_unread(outcome)


def test_missing_or_wrong_credentials_with_a_big_body_are_refused_unread(
    gateway: DaphneProcess, sign: Sign
) -> None:
    wrong_key = sign(api_key="not-the-key")
    wrong_secret = sign(secret="not-the-secret")
    stale = sign(now=time.time() - 3600)
    v2_wrong = signing.signed_headers_v2(
        API_KEY, "not-the-secret", method="POST", target="/job"
    )
    for headers in ({}, wrong_key, wrong_secret, stale, v2_wrong):
        for path in ("/job", "/job/next", "/ws/ticket", "/health", "/nowhere"):
            declared = keep_sending(gateway.port, _post(path, headers, MEANT_TO_SEND))
            assert_refused_unread(declared)
        chunked = keep_sending(gateway.port, _post("/job", headers, None), chunked=True)
        assert_refused_unread(chunked)


def test_the_admin_is_bounded_by_djangos_own_limit(gateway: DaphneProcess) -> None:
    outcome = keep_sending(gateway.port, _post("/admin/login/", {}, MEANT_TO_SEND))
    assert_refused_unread(outcome, ADMIN_LIMIT)
    # Under it, the admin reads the form as before (CSRF refuses this one).
    small = httpx.post(
        f"{gateway.base_url}/admin/login/", content=b"x" * (MAX_JOB_BYTES * 2)
    )
    assert small.status_code == 403


@pytest.mark.usefixtures("fresh")
def test_bodies_within_the_limit_are_served_as_before(
    gateway: DaphneProcess, sign: Sign
) -> None:
    job = json.dumps({"job_id": "chunked-1", "fields": {"a": "x" * 1000}}).encode()
    with httpx.Client(base_url=gateway.base_url, timeout=10) as http:
        # Chunked (a generator body has no length), signed: published.
        chunked = http.post(
            "/job",
            content=iter([job[:100], job[100:]]),
            headers={**sign(), "Content-Type": "application/json"},
        )
        assert chunked.status_code == 201, chunked.text
        assert chunked.json()["job"]["job_id"] == "chunked-1"
        # At the limit exactly: read, and refused for what it says, not its size.
        at_limit = b"[" + b" " * (MAX_JOB_BYTES - 2) + b"]"
        answer = http.post(
            "/job",
            content=at_limit,
            headers={**sign(), "Content-Type": "application/json"},
        )
        assert answer.status_code == 400, answer.text
        # Unsigned and within the limit: the contract's order, 401 first.
        unsigned = http.post("/job", content=at_limit)
        assert unsigned.status_code == 401
        assert unsigned.json()["error"] == "missing_api_key"


def test_the_refusal_is_logged(gateway: DaphneProcess) -> None:
    keep_sending(
        gateway.port,
        _post("/job?api_key=leaked", {"X-Request-ID": "big-body-1"}, MEANT_TO_SEND),
    )
    gateway.wait_for_output("request_id=big-body-1")
    (line,) = [line for line in gateway.output().splitlines() if "big-body-1" in line]
    assert "gateway.access POST /job?api_key=[redacted] 413" in line


def test_the_seam_checks_what_it_relies_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.web import http

    assert daphne_patches.body_limit_problems() == []

    def all_headers_received(self: http.HTTPChannel) -> None:
        pass  # a Twisted whose channel no longer calls gotLength

    monkeypatch.setattr(http.HTTPChannel, "allHeadersReceived", all_headers_received)
    assert daphne_patches.body_limit_problems() == [
        "HTTPChannel.allHeadersReceived no longer uses ['gotLength']"
    ]


@pytest.mark.parametrize(
    ("series", "found"),
    [({"daphne": ("4.1",)}, "daphne 4.2"), ({"Twisted": ("24.11",)}, "Twisted 26.10")],
)
def test_another_release_stops_the_server_in_one_line(
    series: dict[str, tuple[str, ...]], found: str
) -> None:
    # What daphne does with the application's module: import it.
    code = (
        "import gateway_project.server as s; "
        f"s.WRITTEN_FOR = {{**s.WRITTEN_FOR, **{series!r}}}; "
        "import gateway_project.asgi"
    )
    env = {
        **os.environ,
        "API_KEY": API_KEY,
        "HMAC_SECRET": HMAC_SECRET,
        "DJANGO_SECRET_KEY": "k" * 50,
    }
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(
        "Refusing to serve: the request body limit cannot be applied: " + found
    )
