"""The flood-waves benchmark's counting, and its flood against a real daphne."""

from __future__ import annotations

import pytest

from bench.common import run_async
from bench.flood_waves import WINDOW, Arrivals, flood, parse_args
from bench.gateway import Gateway
from bench.loadtest_http import admitted


def test_even_arrivals_and_waves_are_told_apart() -> None:
    # 100 windows in 5 s: one request in each, or all 100 in one per second.
    even = Arrivals.of([(n + 0.5) * WINDOW for n in range(100)], 0.0, 5.0)
    assert (even.per_second, even.busiest_window, even.median_window) == (20, 1, 1)
    assert even.busiest_tenth_share == pytest.approx(0.1)
    waves = Arrivals.of(
        [second + 0.001 for second in range(5) for _ in range(20)], 0.0, 5.0
    )
    assert (waves.per_second, waves.busiest_window, waves.median_window) == (20, 20, 0)
    assert waves.busiest_tenth_share == 1.0


@pytest.mark.processes
def test_the_flood_is_refused_and_held() -> None:
    gateway = Gateway(access_log=False, extra_env={"AUTH_FAILURE_DELAY_SECONDS": "0.2"})
    try:
        gateway.start()
        sent_at, answers = run_async(
            flood(gateway.base_url, connections=6, seconds=1.0)
        )
    finally:
        gateway.close()
    assert set(answers) == {"HTTP 401", "WS 403"}
    assert admitted(answers) == 0
    assert sum(answers.values()) == len(sent_at)
    # Each connection waited for its held answers, then sent again.
    assert 6 < len(sent_at) < 6 * 1.0 / (0.2 * 0.75) + 6
    assert sent_at == sorted(sent_at)


def test_arguments_are_checked() -> None:
    assert parse_args([]).connections == 64
    with pytest.raises(SystemExit):
        parse_args(["--seconds", "2"])
