"""What one server patch earns: the benchmarks' ``--without PATCH``.

Each benchmark runs the gateway with every patch of the server seam beside
the same gateway started with ``GATEWAY_SERVER_LEAVE_OUT=PATCH``
(gateway_project/server), so that docs/benchmarks.md's table of patches can
be remade by its commands.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from bench import fanout, http, refused
from bench.fanout_client import Expected, tally
from bench.gateway import Gateway
from gateway_project.server import LEAVE_OUT_VARIABLE


def _left_out(server: object) -> str | None:
    assert isinstance(server, Gateway)
    try:
        return server.env().get(LEAVE_OUT_VARIABLE)
    finally:
        server.close()


def test_bench_http_compares_the_gateway_with_and_without_a_patch() -> None:
    args = http.parse_args(["--without", "form_bodies", "--no-baseline"])
    with contextlib.ExitStack() as stack:
        (group,) = http.build_groups(args, stack)
    with_all, without = group.sides
    assert group.baseline is with_all  # ratios are without / with
    assert _left_out(with_all.make()) is None
    assert _left_out(without.make()) == "form_bodies"


def test_bench_fanout_compares_the_gateway_with_and_without_a_patch() -> None:
    args = fanout.parse_args(
        ["--without", "frames_at_once", "--no-baseline", "--configs", "embedded"]
    )
    with contextlib.ExitStack() as stack:
        with_all, without = fanout.build_sides(args, stack)
    assert without.compare_to == with_all.key
    assert _left_out(with_all.make(with_all)) is None
    assert _left_out(without.make(without)) == "frames_at_once"


def test_bench_refused_measures_refusals_with_and_without_a_patch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--without", "consumer_dispatch", "--rounds", "1"]
    argv += ["--requests", "40", "--handshakes", "20", "--concurrency", "4"]
    assert refused.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0] == (
        "| server | unsigned GET /job/next µs | unsigned POST /job µs "
        "| refused handshake µs |"
    )
    assert [row.split(" | ")[0] for row in rows[2:]] == [
        "| every patch",
        "| without consumer_dispatch",
    ]
    assert "http_us without / with: median " in out
    assert "post_us without / with: median " in out
    assert "ws_us without / with: median " in out


def test_bench_fanout_adds_the_gateway_under_serve_beside_the_seed_on_redis() -> None:
    args = fanout.parse_args(
        ["--no-baseline", "--configs", "embedded", "--processes", "3", "--busy", "1"]
    )
    assert args.busy == 1
    with contextlib.ExitStack() as stack:
        sides = fanout.build_sides(args, stack)
        served = sides[-1]
        assert (served.key, served.config) == ("gateway-serve-3", "serve")
        gateway = served.make(served)
        assert isinstance(gateway, Gateway)
        assert gateway.processes == 3
        assert gateway.redis_url  # the processes share the jobs through Redis
        gateway.close()


class Frames:
    """What ``tally`` reads of a client: its frames, with arrival times."""

    def __init__(self, *frames: tuple[float, str]) -> None:
        self.frames = [(at, job.encode()) for at, job in frames]


def _frame(job_id: str, sent_at: float) -> str:
    job = {"id": 1, "job_id": job_id, "fields": {"sent_at": sent_at}}
    return json.dumps({"type": "job", "job": job})


def test_bench_fanout_times_each_job_by_its_last_client() -> None:
    sent = {"a": 10.0, "b": 20.0}
    clients = [
        Frames((10.010, _frame("a", 10.0)), (20.030, _frame("b", 20.0))),
        Frames((10.050, _frame("a", 10.0))),  # never gets b
    ]
    counted = tally(
        clients,  # type: ignore[arg-type]
        Expected(sent, set(sent)),
        gateway=True,
        until=100.0,
    )
    assert counted.missing == 1
    assert counted.last_ms["a"] == pytest.approx(50.0)
    assert counted.last_ms["b"] == float("inf")
