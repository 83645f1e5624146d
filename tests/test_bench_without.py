"""What one server patch earns: the benchmarks' ``--without PATCH``.

Each benchmark runs the gateway with every patch of the server seam beside
the same gateway started with ``GATEWAY_SERVER_LEAVE_OUT=PATCH``
(gateway_project/server), so that docs/benchmarks.md's table of patches can
be remade by its commands.
"""

from __future__ import annotations

import contextlib

import pytest

from bench import fanout, http, refused
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
