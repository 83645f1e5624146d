"""The server seam (gateway_project/server): what each patch relies on, checked.

Each patch's behaviour is tested where the feature is (the body limit in
tests/test_body_limit_live.py, the access log in tests/test_logs.py, form
bodies in tests/test_live_http.py, frames at once in tests/test_ws_live.py,
prepared frames and the consumer's dispatch in tests/test_ws_consumer.py).
Here: on the pinned releases every patch finds what it relies on; each check
fails when that internal changes; and ``apply()`` leaves a speed patch out in
one log line, stops the server in one line for a protection, and never
applies half of the patches.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from gateway_project import server
from gateway_project.server import consumer, daphne_patches, log_patches
from gateway_project.server.api_handler import api_handler_problems
from testkit.servers import REPO_ROOT
from tests.stack import API_KEY, HMAC_SECRET

NAMES = [patch.name for patch in server.patches(lambda path: None)]


def _patch(name: str) -> server.Patch:
    (patch,) = [p for p in server.patches(lambda path: None) if p.name == name]
    return patch


@pytest.mark.parametrize("name", NAMES)
def test_every_patch_finds_what_it_relies_on_on_the_pinned_releases(
    name: str,
) -> None:
    import gateway_project.asgi  # noqa: F401 (applies them)

    assert server.why_not_applied(_patch(name)) == ""
    assert name in server.applied


def test_the_patches_are_the_ones_the_docs_list() -> None:
    table = (REPO_ROOT / "docs" / "benchmarks.md").read_text("utf-8")
    assert [name for name in NAMES if f"`{name}`" not in table] == []
    assert {p.name for p in server.patches(lambda path: None) if p.required} == {
        "body_limit",
        "access_log_redaction",
        "twisted_request_log",
        "api_handler",
    }


def _no_names() -> None:
    """A function that refers to none of the names a patch relies on."""


async def _dispatch_with_more(self: Any, message: Any) -> None:
    print(message)  # a Channels whose dispatch does something new


def _init_without_form_switch(self: Any, channel: Any, queued: Any = None) -> None:
    """A Twisted Request without ``parsePOSTFormSubmission``."""


def _prepared_message(self: Any, payload: bytes, isBinary: bool) -> None:
    """An autobahn PreparedMessage taking other arguments."""


def _changes() -> list[tuple[str, Callable[[pytest.MonkeyPatch], None], str]]:
    """Per patch: a change to an internal it relies on, and what its check says."""
    from autobahn.websocket import protocol
    from channels.consumer import AsyncConsumer
    from daphne.access import AccessLogGenerator
    from daphne.ws_protocol import WebSocketProtocol
    from django.core.handlers.asgi import ASGIHandler
    from twisted.internet.abstract import FileDescriptor
    from twisted.web.http import HTTPChannel, Request

    return [
        (
            "body_limit",
            lambda mp: mp.setattr(HTTPChannel, "allHeadersReceived", _no_names),
            "HTTPChannel.allHeadersReceived no longer uses ['gotLength']",
        ),
        (
            "access_log_redaction",
            lambda mp: mp.setattr(AccessLogGenerator, "__call__", _no_names),
            "AccessLogGenerator.__call__ no longer uses write_entry",
        ),
        (
            "twisted_request_log",
            lambda mp: mp.setattr(Request, "finish", _no_names),
            "Twisted's Request.finish no longer calls its factory's log",
        ),
        (
            "api_handler",
            lambda mp: mp.setattr(ASGIHandler, "handle", _no_names),
            "ASGIHandler.handle no longer uses ['read_body', 'create_request', "
            "'send_response', 'listen_for_disconnect', 'run_get_response']",
        ),
        (
            "form_bodies",
            lambda mp: mp.setattr(Request, "__init__", _init_without_form_switch),
            "Twisted's Request takes no parsePOSTFormSubmission",
        ),
        (
            "frames_at_once",
            lambda mp: mp.delattr(WebSocketProtocol, "onOpen"),
            "daphne's WebSocketProtocol no longer defines onOpen",
        ),
        (
            "frames_at_once",
            lambda mp: mp.setattr(FileDescriptor, "__init__", _no_names),
            "Twisted's FileDescriptor keeps no _tempDataBuffer",
        ),
        (
            "prepared_frames",
            lambda mp: mp.setattr(
                protocol.PreparedMessage, "__init__", _prepared_message
            ),
            "autobahn's PreparedMessage takes other arguments",
        ),
        (
            "autobahn_debug",
            lambda mp: mp.delattr(protocol, "hlval"),
            "autobahn.websocket.protocol has no hlval",
        ),
        (
            "consumer_dispatch",
            lambda mp: mp.setattr(AsyncConsumer, "dispatch", _dispatch_with_more),
            "Channels' AsyncConsumer.dispatch now uses ['print']",
        ),
    ]


@pytest.mark.parametrize(
    ("name", "change", "problem"),
    _changes(),
    ids=[f"{name}-{n}" for n, (name, _, _) in enumerate(_changes())],
)
def test_each_check_fails_when_the_internal_it_relies_on_changes(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    change: Callable[[pytest.MonkeyPatch], None],
    problem: str,
) -> None:
    patch = _patch(name)
    assert patch.problems() == []
    change(monkeypatch)
    assert problem in patch.problems()
    assert problem in server.why_not_applied(patch)


def test_a_check_is_the_patch_modules_own() -> None:
    # The registry checks with the functions the patch modules define.
    checks = {p.name: p.problems for p in server.patches(lambda path: None)}
    assert checks["body_limit"] is daphne_patches.body_limit_problems
    assert checks["access_log_redaction"] is log_patches.access_log_problems
    assert checks["consumer_dispatch"] is consumer.consumer_dispatch_problems
    assert api_handler_problems() == []


def test_another_release_is_named_without_reading_its_internals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(server.WRITTEN_FOR, "autobahn", ("99.1",))
    found = server.why_not_applied(_patch("autobahn_debug"))
    assert found.startswith("autobahn ")
    assert found.endswith(" (written for 99.1)")


# --- apply(): all or nothing for protections, one line for the rest -------------


def _fake(name: str, required: bool, problems: list[str], log: list[str]) -> Any:
    return server.Patch(
        name,
        f"the {name}",
        (),
        required,
        lambda: problems,
        lambda: log.append(name),
    )


def test_a_protection_that_cannot_be_applied_leaves_nothing_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    done: list[str] = []
    fakes = [
        _fake("first", True, [], done),
        _fake("fast", False, [], done),
        _fake("guard", True, ["Twisted's Request has no gotLength"], done),
    ]
    monkeypatch.setattr(server, "patches", lambda limit_for: fakes)
    with pytest.raises(server.ServerPatchError) as raised:
        server.apply(lambda path: None)
    assert str(raised.value) == (
        "the guard cannot be applied: Twisted's Request has no gotLength"
    )
    assert done == []


def test_a_speed_patch_that_cannot_be_applied_is_left_out_in_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    done: list[str] = []
    fakes = [
        _fake("guard", True, [], done),
        _fake("broken", False, ["daphne's Server has no create_application"], done),
        _fake("fast", False, [], done),
    ]
    monkeypatch.setattr(server, "patches", lambda limit_for: fakes)
    monkeypatch.setattr(server, "applied", set())
    with caplog.at_level(logging.WARNING, logger="gateway.server"):
        server.apply(lambda path: None)
    assert done == ["guard", "fast"]
    assert server.applied == {"guard", "fast"}
    assert [r.getMessage() for r in caplog.records] == [
        "Server patch broken left out: daphne's Server has no create_application."
    ]


def _serve(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Import the ASGI module as daphne does, in a fresh interpreter, then ``code``."""
    return subprocess.run(
        [sys.executable, "-c", "import gateway_project.asgi as asgi\n" + code],
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "API_KEY": API_KEY,
            "HMAC_SECRET": HMAC_SECRET,
            "DJANGO_SECRET_KEY": "k" * 50,
            "PYTHONWARNINGS": "ignore",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_benchmarks_switch_leaves_one_speed_patch_out() -> None:
    done = _serve(
        "from daphne.ws_protocol import WebSocketProtocol\n"
        "from jobs.consumers import JobConsumer\n"
        "import gateway_project.server as s\n"
        "print(getattr(WebSocketProtocol.onOpen, 'writes_at_once', False))\n"
        "print(sorted(s.applied))\n",
        GATEWAY_SERVER_LEAVE_OUT="frames_at_once, consumer_dispatch",
    )
    assert done.returncode == 0, done.stderr
    left_out, applied = done.stdout.strip().splitlines()
    assert left_out == "False"
    assert "frames_at_once" not in applied and "consumer_dispatch" not in applied
    assert "prepared_frames" in applied
    lines = [line for line in done.stderr.splitlines() if "gateway.server" in line]
    assert len(lines) == 2, done.stderr
    assert "Server patch frames_at_once left out: GATEWAY_SERVER_LEAVE_OUT" in lines[0]


@pytest.mark.parametrize(
    ("leave_out", "line"),
    [
        ("body_limit", "Refusing to serve: the request body limit cannot be left out."),
        (
            "access_log_redaction",
            "Refusing to serve: the redaction of daphne's access log cannot be "
            "left out.",
        ),
        (
            "frames_at_onse",
            "Refusing to serve: GATEWAY_SERVER_LEAVE_OUT names no patch "
            "['frames_at_onse'].",
        ),
    ],
)
def test_a_protection_is_never_left_out(leave_out: str, line: str) -> None:
    done = _serve("", GATEWAY_SERVER_LEAVE_OUT=leave_out)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [line]


def test_on_another_autobahn_its_speed_patches_are_left_out_and_serving_goes_on() -> (
    None
):
    code = (
        "import gateway_project.server as s\n"
        "s.WRITTEN_FOR['autobahn'] = ('99.1',)\n"
        "import gateway_project.asgi\n"
        "print(sorted(s.applied))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "API_KEY": API_KEY,
            "HMAC_SECRET": HMAC_SECRET,
            "DJANGO_SECRET_KEY": "k" * 50,
            "PYTHONWARNINGS": "ignore",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "autobahn_debug" not in done.stdout
    assert "prepared_frames" not in done.stdout
    assert "body_limit" in done.stdout
    lines = [line for line in done.stderr.splitlines() if "gateway.server" in line]
    assert [line.split(" left out: ")[0].split()[-1] for line in lines] == [
        "prepared_frames",
        "autobahn_debug",
    ]
    assert all("(written for 99.1)" in line for line in lines)
