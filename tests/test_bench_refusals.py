"""The refusal benchmark's bookkeeping, against a real daphne (no timing asserted)."""

from __future__ import annotations

import pytest

from bench.common import run_async
from bench.gateway import Gateway
from bench.refusals import KINDS, Server, measure, parse_args, report

pytestmark = pytest.mark.processes


def test_each_kind_is_refused_and_costed_per_request() -> None:
    gateway = Gateway(access_log=False, extra_env={"AUTH_FAILURE_DELAY_SECONDS": "0"})
    try:
        gateway.start()
        assert gateway.pid is not None
        server = Server("gateway", gateway.base_url, gateway.pid)
        run_async(measure(server, requests=10))
        run_async(measure(server, requests=10))
    finally:
        gateway.close()

    # Forged signatures are 401s, a forged key's handshake a 403; warm-up
    # requests are not counted.
    assert server.answers == {"HTTP 401": 40, "WS 403": 20}
    assert server.admitted == 0
    assert set(server.cpu_ms) == set(KINDS)
    for kind in KINDS:
        assert len(server.cpu_ms[kind]) == 2  # one figure per round
        assert all(value >= 0 for value in server.cpu_ms[kind])
    table = report([server], rounds=2)
    assert all(kind in table for kind in KINDS)


def test_an_admitted_request_is_counted() -> None:
    server = Server("gateway", "http://127.0.0.1:1", 1)
    server.answers.update({"HTTP 401": 5, "HTTP 201": 1, "WS 101": 2})
    assert server.admitted == 3


def test_arguments_are_checked() -> None:
    assert parse_args([]).requests == 1000
    with pytest.raises(SystemExit):
        parse_args(["--requests", "0"])
