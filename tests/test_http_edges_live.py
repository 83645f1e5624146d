"""The API's edges through a real daphne: odd targets, encoded slashes, hex case."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from gateway_client import signing
from testkit.servers import LOOPBACK, DaphneProcess
from tests.conftest import process_env
from tests.stack import API_KEY, HMAC_SECRET, STACK

pytestmark = [pytest.mark.backends, pytest.mark.processes]

Sign = Callable[..., dict[str, str]]


@pytest.fixture(scope="module")
def gateway(django_db_setup: None) -> Iterator[DaphneProcess]:
    with DaphneProcess(env=process_env()) as process:
        yield process


@pytest.fixture
def http(
    gateway: DaphneProcess, transactional_db: None, request: pytest.FixtureRequest
) -> Iterator[httpx.Client]:
    """A client of the module's daphne; each test starts on an empty store."""
    if STACK == "services":
        request.getfixturevalue("clean_redis")
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        yield client


def raw(port: int, request_line: str, headers: dict[str, str] | None = None) -> bytes:
    """One request sent as written (no client library tidies its target)."""
    lines = [request_line, f"Host: {LOOPBACK}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        while data := sock.recv(65536):
            received += data
    return received


def json_404(received: bytes) -> dict[str, str]:
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    assert status_line.split()[1] == "404", received
    assert headers["content-type"] == "application/json", received
    assert headers["x-content-type-options"] == "nosniff"
    data: dict[str, str] = json.loads(body)
    assert data["error"] == "not_found"
    return data


def test_every_api_answer_says_nosniff(http: httpx.Client, sign: Sign) -> None:
    answers = [
        http.get("/healthz"),
        http.get("/health", headers=sign()),
        http.get("/job/next", headers=sign()),  # 204
        http.get("/job/next"),  # 401
        http.get("/nowhere"),  # 404
        http.post("/job", json={"job_id": "nosniff-1"}, headers=sign()),  # 201
        http.post("/job", content=b"[", headers=sign()),  # 415
        http.get("/openapi.json"),
    ]
    assert [answer.status_code for answer in answers] == [
        200, 200, 204, 401, 404, 201, 415, 200,
    ]  # fmt: skip
    for answer in answers:
        assert answer.headers["X-Content-Type-Options"] == "nosniff", answer


@pytest.mark.usefixtures("http")
def test_options_star_and_control_characters_are_the_apis_404(
    gateway: DaphneProcess, sign: Sign
) -> None:
    assert json_404(raw(gateway.port, "OPTIONS * HTTP/1.1"))["detail"] == (
        "No such endpoint: *"
    )
    for target in ("/job%0a", "/job/next%0d%0a", "/%00", "/health%1b[31m", "/%0a"):
        data = json_404(raw(gateway.port, f"GET {target} HTTP/1.1", sign()))
        assert data["detail"].startswith("No such endpoint: /")


@pytest.mark.usefixtures("http")
def test_an_encoded_slash_is_not_a_slash(gateway: DaphneProcess, sign: Sign) -> None:
    for target in ("/job%2fnext", "/job%2Fnext", "/ws%2fticket", "/admin%2flogin/"):
        # Signed, and with a method the real endpoint takes: still unknown.
        method = "POST" if "ticket" in target else "GET"
        data = json_404(raw(gateway.port, f"{method} {target} HTTP/1.1", sign()))
        assert data["detail"] == "No such endpoint: " + target.replace("%2f", "%2F")
    # The decoded path is served as before.
    served = raw(gateway.port, "GET /job/nex%74 HTTP/1.1", sign())
    assert served.startswith(b"HTTP/1.1 204 "), served


def test_hex_signatures_are_accepted_in_either_case(
    http: httpx.Client, sign: Sign
) -> None:
    v1 = sign()
    v1["X-SIGNATURE"] = v1["X-SIGNATURE"].upper()
    assert http.get("/job/next", headers=v1).status_code == 204

    def v2(nonce: str, case: Callable[[str], str]) -> dict[str, str]:
        headers = signing.signed_headers_v2(
            API_KEY, HMAC_SECRET, method="GET", target="/job/next", nonce=nonce
        )
        headers["X-SIGNATURE"] = case(headers["X-SIGNATURE"])
        return headers

    nonce = signing.new_nonce()
    assert http.get("/job/next", headers=v2(nonce, str.upper)).status_code == 204
    mixed = signing.new_nonce().upper()
    swapped = v2(mixed, lambda hex_: "".join(
        char.upper() if index % 2 else char for index, char in enumerate(hex_)
    ))  # fmt: skip
    assert http.get("/job/next", headers=swapped).status_code == 204
    # A nonce is one nonce in either case: signed afresh, it is still a replay.
    for again in (nonce.upper(), mixed.lower()):
        replayed = http.get("/job/next", headers=v2(again, str.lower))
        assert replayed.status_code == 401
        assert replayed.json()["error"] == "replayed_nonce"
    # Not hex at all is no signature.
    not_hex = http.get("/job/next", headers=v2(signing.new_nonce(), "g{}".format))
    assert not_hex.json()["error"] == "bad_signature"


@pytest.mark.parametrize("target", ["/ws%0aX", "/ws/", "/other", "/ws%2f"])
def test_a_handshake_to_any_other_path_is_refused_quietly(
    gateway: DaphneProcess, target: str
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{gateway.ws_url}{target}?api_key={API_KEY}", open_timeout=10)
    assert refused.value.response.status_code == 403
    output = gateway.output()
    assert "No route found" not in output
    assert "Traceback" not in output
    assert "refused: no such path" in output
