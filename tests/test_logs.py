"""Log lines: request ids, JSON, and no credentials anywhere, daphne's included."""

from __future__ import annotations

import json
import logging
import pprint
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from autobahn.twisted import websocket as autobahn_adapter
from autobahn.websocket import protocol as autobahn_protocol
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway_client.signing import signed_headers
from gateway_project.server.log_patches import defer_autobahn_debug_formatting
from jobs.logs import (
    ContextFilter,
    JsonFormatter,
    escaped,
    new_request_id,
    redact_query,
    redact_text,
)
from testkit.servers import DaphneProcess
from tests.conftest import process_env
from tests.stack import API_KEY, HMAC_SECRET

Sign = Callable[..., dict[str, str]]
SECRET = "secret-value-xyz"


def test_request_ids_from_clients_must_be_sane() -> None:
    assert new_request_id("abc-123_x.y:z") == "abc-123_x.y:z"
    for bad in ("", "a" * 65, "has space", "new\nline", None):
        generated = new_request_id(bad)
        assert generated != bad
        assert len(generated) == 32


def test_credentials_are_redacted() -> None:
    assert redact_query(f"api_key={SECRET}&since=4&sig={SECRET}") == (
        "api_key=[redacted]&since=4&sig=[redacted]"
    )
    assert SECRET not in redact_text(f'"GET /ws?since=1&API_KEY={SECRET}" 403')
    assert SECRET not in redact_text(f"/job?ticket={SECRET}")


def test_json_lines_carry_the_ids() -> None:
    record = logging.LogRecord("jobs.x", logging.INFO, "", 0, "hi %s", ("you",), None)
    record.request_id = "r1"
    record.job_id = "j1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hi you"
    assert line["level"] == "INFO"
    assert line["logger"] == "jobs.x"
    assert (line["request_id"], line["job_id"]) == ("r1", "j1")
    assert "time" in line
    plain = logging.LogRecord("jobs.x", logging.INFO, "", 0, "hi", (), None)
    ContextFilter().filter(plain)
    assert "request_id" not in json.loads(JsonFormatter().format(plain))


@pytest.mark.backends
async def test_api_echoes_a_sane_request_id(api: httpx.AsyncClient, sign: Sign) -> None:
    sane = await api.get("/health", headers={**sign(), "X-Request-ID": "req-42"})
    assert sane.headers["X-Request-ID"] == "req-42"
    insane = await api.get("/health", headers={**sign(), "X-Request-ID": "a b"})
    assert insane.headers["X-Request-ID"] not in ("", "a b")
    error = await api.get("/job/next")
    assert error.status_code == 401
    assert error.headers["X-Request-ID"]


@pytest.fixture
def json_gateway(transactional_db: None) -> Iterator[DaphneProcess]:
    """daphne with ``LOG_FORMAT=json``, at its default verbosity (access log on)."""
    with DaphneProcess(env=process_env(LOG_FORMAT="json")) as process:
        yield process


def json_lines(output: str) -> list[dict[str, Any]]:
    lines = []
    for text in output.splitlines():
        if text.startswith("{"):
            lines.append(json.loads(text))
    return lines


@pytest.mark.backends
@pytest.mark.processes
async def test_no_secret_reaches_any_log(json_gateway: DaphneProcess) -> None:
    headers = signed_headers(API_KEY, HMAC_SECRET)
    with pytest.raises(InvalidStatus):
        async with connect(
            f"{json_gateway.ws_url}/ws?api_key={SECRET}&since=0",
            proxy=None,
            open_timeout=5,
        ):
            pass
    async with connect(
        f"{json_gateway.ws_url}/ws?api_key={API_KEY}",
        additional_headers={"X-Request-ID": "ws-req-1"},
        proxy=None,
        open_timeout=5,
    ) as ws:
        await ws.recv()
    async with httpx.AsyncClient(
        base_url=json_gateway.base_url, trust_env=False
    ) as http:
        await http.get(f"/health?api_key={SECRET}", headers=headers)
        posted = await http.post(
            "/job",
            json={"job_id": "logged-job"},
            headers={**headers, "X-Request-ID": "post-req-1"},
        )
        assert posted.status_code == 201
    json_gateway.wait_for_output("post-req-1")
    output = json_gateway.output()
    assert SECRET not in output
    assert f"api_key={API_KEY}" not in output
    lines = json_lines(output)
    access = [line for line in lines if line["logger"] == "gateway.access"]
    paths = [line["path"] for line in access]
    assert "/ws?api_key=[redacted]&since=0" in paths
    assert "/ws?api_key=[redacted]" in paths
    assert "/health?api_key=[redacted]" in paths
    assert all(line["request_id"] for line in access)
    ws_line = next(line for line in access if line["request_id"] == "ws-req-1")
    assert ws_line["status"] == 101
    assert "refused" not in ws_line
    # A refused handshake's reason is in its access line, the only line it
    # writes: a flood of them is not two lines each.
    (refused,) = (line for line in access if line["status"] == 403)
    assert refused["path"] == "/ws?api_key=[redacted]&since=0"
    assert refused["refused"] == "bad_api_key"
    assert refused["message"].endswith(" refused: bad_api_key")
    assert not [line for line in lines if "handshake refused" in line["message"]]
    published = next(
        line
        for line in lines
        if line["logger"] == "jobs.services" and "published" in line["message"]
    )
    assert published["request_id"] == "post-req-1"
    assert published["job_id"] == "logged-job"
    post_line = next(line for line in access if line["request_id"] == "post-req-1")
    assert (post_line["http_method"], post_line["status"]) == ("POST", 201)
    # daphne's own NCSA lines are still written, redacted.
    assert '"GET /health?api_key=[redacted]" 200' in output


@pytest.mark.backends
@pytest.mark.processes
async def test_daphne_at_its_highest_verbosity_logs_no_secret(
    transactional_db: None,
) -> None:
    # At -v 2 daphne hands Twisted's log to Python's: Twisted's own request
    # line (the whole URI) must not be written at all.
    with DaphneProcess(env=process_env(), extra_args=["-v", "2"]) as daphne:
        async with httpx.AsyncClient(base_url=daphne.base_url, trust_env=False) as http:
            await http.get(f"/health?api_key={SECRET}")
        # daphne's own line, written after Twisted's would have been.
        daphne.wait_for_output('"GET /health?api_key=[redacted]" 401')
        output = daphne.output()
    assert "/health?api_key=[redacted] 401" in output  # the gateway's line
    assert SECRET not in output


@pytest.mark.backends
@pytest.mark.processes
async def test_plain_lines_redact_too(live_gateway: Any) -> None:
    async with httpx.AsyncClient(
        base_url=live_gateway.base_url, trust_env=False
    ) as http:
        await http.get(f"/job/next?api_key={SECRET}")
    live_gateway.process.wait_for_output("/job/next?api_key=[redacted] 401")
    assert SECRET not in live_gateway.process.output()


# --- autobahn's debug lines -----------------------------------------------------


class _Counted:
    """Counts how often it is turned into text."""

    def __init__(self) -> None:
        self.times = 0

    def __repr__(self) -> str:
        self.times += 1
        return "counted"

    __str__ = __repr__


def test_autobahn_formats_its_debug_lines_only_when_written() -> None:
    # The gateway's ASGI module applies it; twice wraps nothing twice.
    defer_autobahn_debug_formatting()
    defer_autobahn_debug_formatting()
    assert autobahn_protocol.pformat.defers is pprint.pformat  # type: ignore[attr-defined]
    value = _Counted()
    # What WebSocketProtocol._connectionMade and sendData hand their debug calls.
    arguments = [
        autobahn_protocol.pformat([value]),  # type: ignore[attr-defined]
        autobahn_protocol.hlval(value),  # type: ignore[attr-defined,no-untyped-call]
        autobahn_protocol.hltype(autobahn_protocol.WebSocketProtocol.sendData),  # type: ignore[attr-defined,no-untyped-call]
    ]
    assert value.times == 0
    line = "{} {} {}".format(*arguments)  # as autobahn's logger writes one
    assert value.times == 2
    assert "[counted]" in line
    assert "WebSocketProtocol.sendData" in line
    # What its Twisted adapter hands them for each connection and read.
    adapted = [
        autobahn_adapter.hltype(autobahn_adapter.WebSocketAdapterProtocol.dataReceived),  # type: ignore[attr-defined,no-untyped-call]
        autobahn_adapter.hlval(value),  # type: ignore[attr-defined,no-untyped-call]
    ]
    assert value.times == 2
    line = "{} {}".format(*adapted)
    assert value.times == 3
    assert "WebSocketAdapterProtocol.dataReceived" in line
    timings = autobahn_protocol.Timings()  # type: ignore[no-untyped-call]
    timings.track("opened")
    assert isinstance(str(timings), str)
    assert "opened" in str(timings)


# --- Nothing a request sends is written raw -------------------------------------

FORGED = "2026-01-01 00:00:00,000 INFO gateway.access POST /job 201 FORGED"
# Percent-encoded in a URL: a newline, a carriage return, a NUL, an ANSI colour.
HOSTILE = "%0A" + FORGED.replace(" ", "%20") + "%0D%00%1B%5B31m%E2%80%A8"
HOSTILE_TEXT = "\n" + FORGED + "\r\x00\x1b[31m\u2028\x7f\x9b"


def test_escaped_writes_control_characters_as_escapes() -> None:
    assert escaped("/job/next?wait=5 é ✓") == "/job/next?wait=5 é ✓"
    assert escaped("a\nb\rc\td\x00e\x1b[0m\x7f\x9b\u2028\u202e\U000e0001") == (
        "a\\nb\\rc\\td\\x00e\\x1b[0m\\x7f\\x9b\\u2028\\u202e\\U000e0001"
    )


def _raw_controls(text: str) -> list[str]:
    """Characters in ``text`` that are neither printable nor a line break."""
    return [char for char in text if not char.isprintable() and char != "\n"]


@pytest.mark.backends
@pytest.mark.processes
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_a_request_cannot_forge_a_log_line(
    transactional_db: None, log_format: str
) -> None:
    env = process_env(LOG_FORMAT=log_format, LOG_LEVEL="DEBUG")
    with DaphneProcess(env=env) as daphne:
        async with httpx.AsyncClient(base_url=daphne.base_url, trust_env=False) as http:
            targets = [
                f"/job{HOSTILE}",  # an unknown path: 404
                f"/health{HOSTILE}?q=1",
                f"/job/next?wait={HOSTILE}&x{HOSTILE}=1",  # a query: 401
                f"/healthz?{HOSTILE}",
            ]
            for target in targets:
                answer = await http.get(
                    target, headers={"X-Request-ID": "\x1b[31mred\x1b[0m"}
                )
                assert answer.status_code in (200, 401, 404), target
            headers = signed_headers(API_KEY, HMAC_SECRET)
            text = HOSTILE_TEXT.replace("\x00", "")  # a job's text takes no NUL
            job = {"job_id": "forge-1", "title": text, "fields": {text: text}}
            posted = await http.post(
                f"/job?note={HOSTILE}",
                json=job,
                headers={**headers, "X-Request-ID": "forge-post"},
            )
            assert posted.status_code == 201, posted.text
            refused = await http.post(
                "/job", json={**job, "job_id": HOSTILE_TEXT}, headers=headers
            )
            assert refused.status_code == 400
        # A refused handshake (its query in the gateway's line), and one to an
        # unknown path (Channels' routing error, a traceback, in the log).
        for target in (f"/ws?since={HOSTILE}&api_key=wrong", f"/ws{HOSTILE}"):
            with pytest.raises((InvalidStatus, ConnectionClosed)):
                async with connect(
                    daphne.ws_url + target, proxy=None, open_timeout=5
                ) as ws:
                    await ws.recv()
        daphne.wait_for_output("forge-post")
        daphne.wait_for_output("WSDISCONNECT /ws%0A")  # daphne's, the last line
        output = daphne.output()
    lines = output.split("\n")
    # Every request above was logged, and not one line was forged.
    assert sum("FORGED" in line for line in lines) >= 7
    for line in lines:
        assert not _raw_controls(line), repr(line)
        assert not line.startswith(FORGED[:10]), repr(line)
        if "FORGED" in line:
            # Only ever right after the newline, escaped (or still encoded,
            # in daphne's own lines, which write the URI as sent).
            assert re.search(r"(\\n|%0A)2026-01-01", line), repr(line)
    if log_format == "json":
        for record in json_lines(output):
            for value in record.values():
                assert not _raw_controls(str(value)), record
