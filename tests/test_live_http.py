"""The HTTP API and the admin's pages through a real daphne process."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple
from urllib.parse import urljoin

import httpx
import pytest

from gateway_client import signing
from testkit.servers import LOOPBACK, DaphneProcess
from tests.conftest import assert_error, process_env
from tests.stack import STACK

Sign = Callable[..., dict[str, str]]

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def gateway(django_db_setup: None) -> Iterator[DaphneProcess]:
    """One daphne for the module: what ``live_gateway`` starts, started once."""
    with DaphneProcess(env=process_env()) as process:
        yield process


@pytest.fixture
def client(
    gateway: DaphneProcess, transactional_db: None, request: pytest.FixtureRequest
) -> Iterator[httpx.Client]:
    """A client of the module's daphne; each test starts on an empty store."""
    if STACK == "services":
        request.getfixturevalue("clean_redis")
    with httpx.Client(base_url=gateway.base_url, timeout=10) as http:
        yield http


@pytest.mark.backends
def test_publish_claim_and_empty(client: httpx.Client, sign: Sign) -> None:
    posted = client.post(
        "/job",
        json={"job_id": "live-1", "place_id": 42, "fields": {"Players": "3/8"}},
        headers=sign(),
    )
    assert posted.status_code == 201, posted.text
    assert posted.json()["queued"] is True
    duplicate = client.post("/job", json={"job_id": "live-1"}, headers=sign())
    assert duplicate.status_code == 200
    assert duplicate.json()["duplicate"] is True

    claimed = client.get("/job/next", headers=sign())
    assert claimed.status_code == 200
    assert claimed.json() == {"job": posted.json()["job"]}
    empty = client.get("/job/next", headers=sign())
    assert empty.status_code == 204
    assert empty.content == b""

    health = client.get("/health", headers=sign())
    assert health.status_code == 200
    assert health.json()["ok"] is True
    assert client.get("/healthz").json() == {"ok": True}


@pytest.mark.backends
def test_each_signing_failure(client: httpx.Client, sign: Sign) -> None:
    good = sign()
    stale = sign(now=time.time() - 3600)
    # Bytes, because a header value on the wire need not be ASCII.
    cases: list[tuple[dict[str, str] | dict[bytes, bytes], str]] = [
        ({}, "missing_api_key"),
        ({"X-API-KEY": "wrong"}, "bad_api_key"),
        ({b"X-API-KEY": "clé🔑".encode()}, "bad_api_key"),
        ({"X-API-KEY": good["X-API-KEY"]}, "missing_signature"),
        ({**good, "X-TIMESTAMP": "12.5"}, "bad_timestamp"),
        (dict(stale), "stale_timestamp"),
        ({**good, "X-SIGNATURE": "0" * 64}, "bad_signature"),
    ]
    for headers, code in cases:
        response = client.get("/job/next", headers=headers)
        assert_error(response, 401, code)
        assert (
            signing.sign("test-hmac-secret", good["X-TIMESTAMP"]) not in response.text
        )
    upper = {**good, "X-SIGNATURE": good["X-SIGNATURE"].upper()}
    assert client.get("/job/next", headers=upper).status_code == 204


@pytest.mark.backends
def test_error_shapes(client: httpx.Client, sign: Sign) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.delete("/job/next"), 401, "missing_api_key")
    wrong_method = client.delete("/job/next", headers=sign())
    assert_error(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "GET"

    def post(body: bytes, content_type: str) -> httpx.Response:
        headers = {**sign(), "Content-Type": content_type}
        return client.post("/job", content=body, headers=headers)

    assert_error(post(b"{}", "text/plain"), 415, "unsupported_media_type")
    # A form body the server cannot parse is one more unsupported body: the
    # server leaves form bodies to the application (gateway_project.server).
    multipart = post(b"not a multipart body", "multipart/form-data; boundary=x")
    assert_error(multipart, 415, "unsupported_media_type")
    assert_error(post(b"{oops", "application/json"), 400, "bad_json")
    too_big = b'{"job_id": "x", "title": "' + b"x" * 20000 + b'"}'
    assert_error(post(too_big, "application/json"), 413, "too_large")
    assert_error(
        client.get("/healthz", headers={"Host": "evil.example"}), 400, "bad_host"
    )
    assert client.get("/job/next", headers=sign()).status_code == 204  # nothing stored


@pytest.mark.backends
def test_admin_login_page_and_its_styles(client: httpx.Client) -> None:
    assert client.get("/admin/").status_code == 302
    login = client.get("/admin/login/")
    assert login.status_code == 200
    assert login.headers["content-type"].startswith("text/html")
    stylesheets = re.findall(r'<link rel="stylesheet"[^>]*href="([^"]+)"', login.text)
    # Hashed names (base.<hash>.css) once collectstatic has run.
    base = re.compile(r"/static/admin/css/base(\.[0-9a-f]+)?\.css$")
    assert any(base.search(href) for href in stylesheets), stylesheets
    for href in stylesheets:
        css = client.get(urljoin(str(login.url), href))
        assert css.status_code == 200, href
        assert css.headers["content-type"].startswith("text/css"), href
        assert css.content


# --- Answers on the wire ---------------------------------------------------------


def _raw_exchange(port: int, requests: bytes, *, receive_buffer: int = 0) -> bytes:
    """Send ``requests`` on one connection; everything read until it closes."""
    with socket.socket() as sock:
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(10)
        sock.connect((LOOPBACK, port))
        sock.sendall(requests)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    return received


class _Answer(NamedTuple):
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


def _responses(received: bytes) -> list[_Answer]:
    """Split what came back into answers, each sized by its Content-Length."""
    responses = []
    while received:
        head, _, received = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        assert "transfer-encoding" not in headers, head  # never chunked
        if status in (204, 304):
            assert "content-length" not in headers, head
            body = b""
        else:
            length = int(headers["content-length"])
            body, received = received[:length], received[length:]
        responses.append(_Answer(status, headers, body))
    return responses


def _get(
    path: str, *, close: bool = False, headers: Mapping[str, str] | None = None
) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {LOOPBACK}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.backends
@pytest.mark.usefixtures("client")
def test_pipelined_answers_arrive_whole_in_order_with_their_length(
    gateway: DaphneProcess, sign: Sign
) -> None:
    # Five requests at once on one connection: each answer whole, in the
    # order asked, sized by its Content-Length (the 204 has none), never
    # chunked (checked by _responses), then the close the last one asked for.
    answers = _responses(
        _raw_exchange(
            gateway.port,
            _get("/healthz")
            + _get("/openapi.json")
            + _get("/job/next")  # unsigned: 401
            + _get("/job/next", headers=sign())  # nothing queued: 204
            + _get("/nowhere", close=True),
        )
    )
    assert [answer.status for answer in answers] == [200, 200, 401, 204, 404]
    health, schema, unsigned, empty, missing = answers
    assert json.loads(health.body) == {"ok": True}
    assert json.loads(schema.body)["openapi"].startswith("3.1")
    assert json.loads(unsigned.body)["error"] == "missing_api_key"
    assert empty.body == b""
    assert json.loads(missing.body)["error"] == "not_found"


@pytest.mark.backends
@pytest.mark.usefixtures("client")
def test_large_responses_sent_in_parts_arrive_whole_in_order(
    transactional_db: None, sign: Sign
) -> None:
    # Two 2 MB jobs pulled at once over a small receive window. Django sends
    # a body in 64 KB parts: each answer arrives whole, the second after the
    # first, however full Twisted's buffer gets.
    padding = {f"f{n}": "x" * 20_000 for n in range(100)}
    env = process_env(MAX_JOB_BYTES=str(4 * 1024 * 1024))
    with (
        DaphneProcess(env=env) as server,
        httpx.Client(base_url=server.base_url, timeout=10) as http,
    ):
        posted = []
        for number in range(2):
            job = {"job_id": f"large-{number}", "fields": padding}
            answer = http.post("/job", json=job, headers=sign())
            assert answer.status_code == 201, answer.text
            posted.append(answer.json()["job"])
        pulls = _get("/job/next", headers=sign()) + _get(
            "/job/next", headers=sign(), close=True
        )
        received = _raw_exchange(server.port, pulls, receive_buffer=4096)
    pulled = [
        (answer.status, json.loads(answer.body)["job"])
        for answer in _responses(received)
    ]
    assert pulled == [(200, job) for job in posted]
