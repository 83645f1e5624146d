"""The worker's parts, in this process: settings, the backoff schedule, one
long-poll at a time against ``httpx.MockTransport``, and stopping."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_client.__main__ import main, parse_args, with_options
from gateway_client.backoff import Backoff
from gateway_client.client import GatewayClient
from gateway_client.config import ConfigError, WorkerConfig
from gateway_client.filters import JobFilter
from gateway_client.worker import OutputClosed, Worker, WorkerError

ENV = {"API_KEY": "key-one", "HMAC_SECRET": "secret-one"}
JOB = {"id": 1, "job_id": "abc"}


# --- Settings ------------------------------------------------------------------


def test_defaults() -> None:
    config = WorkerConfig.from_env(ENV)
    assert config.base_url == "http://127.0.0.1:8000"
    assert (config.concurrency, config.timeout, config.retries) == (4, 30.0, 0)
    assert (config.initial_backoff, config.max_backoff) == (0.5, 30.0)
    assert (config.wait, config.answer_timeout) == (25.0, 5.0)


@pytest.mark.parametrize(
    ("timeout", "wait"), [("100", 25.0), ("30", 25.0), ("12", 7.0), ("5", 0.0)]
)
def test_the_long_poll_fits_inside_timeout(timeout: str, wait: float) -> None:
    config = WorkerConfig.from_env({**ENV, "TIMEOUT": timeout})
    assert config.wait == wait
    assert config.wait + config.answer_timeout == float(timeout)
    assert config.answer_timeout >= min(5.0, float(timeout))


def test_values_are_read() -> None:
    env = {
        "BASE_URL": "https://127.0.0.1:9000/",
        "API_KEY": " new-key , old-key",
        "HMAC_SECRET": "new-secret,old-secret",
        "CONCURRENCY": "16",
        "TIMEOUT": "10",
        "INITIAL_BACKOFF": "0.1",
        "MAX_BACKOFF": "2",
        "RETRIES": "5",
        "LOG_LEVEL": "debug",
    }
    config = WorkerConfig.from_env(env)
    assert config == WorkerConfig(
        base_url="https://127.0.0.1:9000",
        api_key="new-key",
        hmac_secret="new-secret",
        concurrency=16,
        timeout=10.0,
        initial_backoff=0.1,
        max_backoff=2.0,
        retries=5,
        log_level="DEBUG",
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BASE_URL", "127.0.0.1:8000"),
        ("BASE_URL", "ftp://127.0.0.1"),
        ("CONCURRENCY", "0"),
        ("CONCURRENCY", "four"),
        ("CONCURRENCY", "2.5"),
        ("TIMEOUT", "0"),
        ("TIMEOUT", "-1"),
        ("TIMEOUT", "nan"),
        ("TIMEOUT", "inf"),
        ("INITIAL_BACKOFF", "fast"),
        ("MAX_BACKOFF", "0.1"),  # below INITIAL_BACKOFF's 0.5
        ("RETRIES", "-1"),
        ("LOG_LEVEL", "LOUD"),
        ("WHERE", "money_per_sec>=10M;money"),
        ("WHERE", "Money>=10M"),
        ("WHERE", ";".join(["a=1"] * 21)),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env({**ENV, name: value})
    message = str(caught.value)
    assert name in message and "\n" not in message


@pytest.mark.parametrize("name", ["API_KEY", "HMAC_SECRET"])
@pytest.mark.parametrize("value", [None, "", " , "])
def test_credentials_are_required(name: str, value: str | None) -> None:
    env = {key: v for key, v in ENV.items() if key != name}
    if value is not None:
        env[name] = value
    with pytest.raises(ConfigError, match=name):
        WorkerConfig.from_env(env)


@pytest.mark.parametrize("name", ["API_KEY", "HMAC_SECRET"])
def test_a_non_ascii_credential_is_one_line_naming_the_variable(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([], env={**ENV, name: "\u2026tail-\u00e9t\u00e9"})
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert f"{name} must be printable ASCII" in err and "character 1" in err
    assert "tail" not in err  # the value is a secret, even a wrong one


def test_the_filter_is_read_from_the_environment() -> None:
    env = {
        **ENV,
        "WHERE": " money_per_sec>=10M ; players<players_max;name~a, b;",
        "CHANNELS": "111, 222,",
        "TIER": " 10m+ ",
    }
    assert WorkerConfig.from_env(env).job_filter == JobFilter(
        ("money_per_sec>=10M", "players<players_max", "name~a, b"),
        ("111", "222"),
        "10m+",
    )
    assert not WorkerConfig.from_env({**ENV, "WHERE": " ; ", "TIER": ""}).job_filter


def test_filter_options_replace_the_environments() -> None:
    env = {**ENV, "WHERE": "players>=1", "CHANNELS": "111", "TIER": "gold"}
    config = WorkerConfig.from_env(env)
    where = ["--where", "money_per_sec>=10M", "--where", "players<players_max"]
    args = parse_args([*where, "--tier", "10m+"])
    assert with_options(config, args).job_filter == JobFilter(
        ("money_per_sec>=10M", "players<players_max"), ("111",), "10m+"
    )
    assert with_options(config, parse_args([])).job_filter == config.job_filter
    only_channels = with_options(config, parse_args(["--channels", "A,B"]))
    assert only_channels.job_filter == JobFilter(("players>=1",), ("A", "B"), "gold")


def test_a_malformed_where_option_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--where", "money per sec>=10M"], env=ENV)
    assert caught.value.code == 2
    assert "money per sec>=10M" in capsys.readouterr().err


def test_the_lease_option_is_read_and_checked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = WorkerConfig.from_env(ENV)
    assert with_options(config, parse_args([])).lease is None
    assert with_options(config, parse_args(["--lease", "60"])).lease == 60
    for argv in (["--lease", "0"], ["--lease", "301"], ["--lease", "60", "--ws"]):
        with pytest.raises(SystemExit) as caught:
            main(argv, env=ENV)
        assert caught.value.code == 2
        assert "--lease" in capsys.readouterr().err


@pytest.mark.parametrize("render", [repr, str])
def test_the_config_never_shows_its_secrets(render: Callable[[Any], str]) -> None:
    env = {**ENV, "API_KEY": "key-7f3a9c", "HMAC_SECRET": "secret-51e2d8"}
    config = WorkerConfig.from_env(env)
    text = render(config)
    assert "key-7f3a9c" not in text and "secret-51e2d8" not in text
    assert "base_url='http://127.0.0.1:8000'" in text  # the rest still shows
    # Still there for the worker to use.
    assert (config.api_key, config.hmac_secret) == ("key-7f3a9c", "secret-51e2d8")


def test_main_reports_a_bad_setting_on_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main([], env={"API_KEY": "key-one"})
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "HMAC_SECRET is required" in err


def test_stream_options_need_ws(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--since", "5"], env=ENV)
    assert caught.value.code == 2
    assert "--ws" in capsys.readouterr().err


# --- Backoff -------------------------------------------------------------------


def test_the_backoff_schedule_doubles_up_to_the_maximum() -> None:
    top = Backoff(0.5, 30, random=lambda: 0.0)
    assert [top.next_delay() for _ in range(9)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0
    ]  # fmt: skip
    bottom = Backoff(0.5, 30, random=lambda: 1.0)
    assert [bottom.next_delay() for _ in range(3)] == [0.25, 0.5, 1.0]
    top.reset()
    assert top.next_delay() == 0.5


def test_retry_after_is_a_floor() -> None:
    backoff = Backoff(0.5, 30, random=lambda: 0.0)
    assert backoff.next_delay(retry_after=7) == 7
    assert backoff.next_delay(retry_after=0.1) == 1.0


@given(
    initial=st.floats(0.001, 10),
    extra=st.floats(0, 100),
    draws=st.lists(st.floats(0, 1), min_size=1, max_size=80),
)
def test_every_delay_is_between_half_and_all_of_its_step(
    initial: float, extra: float, draws: list[float]
) -> None:
    values = iter(draws)
    backoff = Backoff(initial, initial + extra, random=lambda: next(values))
    for n in range(len(draws)):
        step = min(initial + extra, initial * 2.0**n)
        assert step / 2 <= backoff.next_delay() <= step


# --- One long-poll at a time -----------------------------------------------------


Answer = httpx.Response | Exception


class Scripted:
    """A mock gateway answering ``GET /job/next`` from a list, in order."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers: Iterator[Answer] = iter(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = next(self.answers)
        if isinstance(answer, Exception):
            raise answer
        return answer


def failure(status: int, code: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": code, "detail": f"{code}."}, headers=headers
    )


def make_worker(
    handler: Callable[[httpx.Request], Any], **settings: str
) -> tuple[Worker, io.StringIO, list[float]]:
    config = WorkerConfig.from_env({**ENV, "TIMEOUT": "30", **settings})
    client = GatewayClient(
        config.base_url,
        api_key=config.api_key,
        hmac_secret=config.hmac_secret,
        timeout=config.answer_timeout,
        transport=httpx.MockTransport(handler),
    )
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    out = io.StringIO()
    worker = Worker(client, config, out=out, sleep=sleep, random=lambda: 0.0)
    return worker, out, slept


async def test_retryable_failures_back_off_then_the_job_is_printed() -> None:
    gateway = Scripted(
        [
            failure(503, "unavailable"),
            failure(502, "bad_gateway"),
            httpx.ConnectError("refused"),
            httpx.ReadTimeout("slow"),
            failure(429, "rate_limited", **{"Retry-After": "20"}),
            httpx.Response(200, json={"job": JOB}),
            failure(503, "unavailable"),
        ]
    )
    worker, out, slept = make_worker(gateway)
    backoff = worker.backoff()
    results = [await worker.poll_once(backoff) for _ in range(7)]
    assert results == [None] * 5 + [JOB, None]
    # Doubling from 0.5; the 429's Retry-After wins; a success starts over.
    assert slept == [0.5, 1.0, 2.0, 4.0, 20.0, 0.5]
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [JOB]
    assert all(r.url.params["wait"] == "25" for r in gateway.requests)


async def test_refused_credentials_stop_the_worker_without_retrying() -> None:
    gateway = Scripted([failure(401, "bad_signature")])
    worker, out, slept = make_worker(gateway)
    with pytest.raises(WorkerError) as caught:
        await worker.poll_once(worker.backoff())
    message = str(caught.value)
    assert "bad_signature" in message and "HMAC_SECRET" in message
    assert "secret-one" not in message
    assert slept == [] and out.getvalue() == ""


async def test_a_bad_request_is_not_retried() -> None:
    worker, _, slept = make_worker(Scripted([failure(404, "not_found")]))
    with pytest.raises(WorkerError, match="not_found"):
        await worker.poll_once(worker.backoff())
    assert slept == []


async def test_the_configured_filter_goes_on_every_long_poll() -> None:
    gateway = Scripted([httpx.Response(204), httpx.Response(200, json={"job": JOB})])
    worker, out, _ = make_worker(
        gateway, WHERE="money_per_sec>=10M;players<players_max", TIER="10m+"
    )
    backoff = worker.backoff()
    await worker.poll_once(backoff)
    await worker.poll_once(backoff)
    for request in gateway.requests:
        params = request.url.params
        assert params.get_list("where") == ["money_per_sec>=10M", "players<players_max"]
        assert (params["tier"], params["wait"]) == ("10m+", "25")
    assert json.loads(out.getvalue()) == JOB


async def test_a_refused_filter_stops_the_worker_naming_the_detail() -> None:
    detail = "tier='gold' is not a tier (10m+)."
    refused = httpx.Response(400, json={"error": "bad_filter", "detail": detail})
    worker, out, slept = make_worker(Scripted([refused]), TIER="gold")
    with pytest.raises(WorkerError) as caught:
        await worker.poll_once(worker.backoff())
    assert detail in str(caught.value) and "TIER" in str(caught.value)
    assert slept == [] and out.getvalue() == ""


async def test_retries_counts_failures_in_a_row() -> None:
    answers: list[Answer] = [failure(503, "unavailable")] * 2
    answers += [httpx.Response(200, json={"job": JOB})]
    answers += [failure(503, "unavailable")] * 3
    worker, _, slept = make_worker(Scripted(answers), RETRIES="3")
    backoff = worker.backoff()
    for _ in range(5):
        await worker.poll_once(backoff)
    with pytest.raises(WorkerError, match="giving up after 3 failures in a row"):
        await worker.poll_once(backoff)
    assert slept == [0.5, 1.0, 0.5, 1.0]


async def test_plain_polling_pauses_when_the_queue_is_empty() -> None:
    gateway = Scripted([httpx.Response(204)])
    worker, _, slept = make_worker(gateway, TIMEOUT="5", INITIAL_BACKOFF="0.2")
    assert await worker.poll_once(worker.backoff()) is None
    assert "wait" not in gateway.requests[0].url.params
    assert slept == [0.2]


@pytest.mark.parametrize(("held", "pause"), [(25.0, []), (12.6, []), (0.01, [0.5])])
async def test_an_empty_answer_that_was_not_held_pauses(
    held: float, pause: list[float]
) -> None:
    worker, _, slept = make_worker(Scripted([httpx.Response(204)]))
    ticks = iter([100.0, 100.0 + held])
    worker.clock = lambda: next(ticks)
    assert await worker.poll_once(worker.backoff()) is None
    assert slept == pause


async def test_a_closed_stdout_is_reported() -> None:
    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    worker, _, _ = make_worker(Scripted([httpx.Response(200, json={"job": JOB})]))
    worker.out = Closed()
    with pytest.raises(OutputClosed, match="job 1 "):
        await worker.poll_once(worker.backoff())


# --- Running and stopping ------------------------------------------------------------


async def test_stop_cancels_every_long_poll_in_flight() -> None:
    started: list[int] = []
    cancelled: list[int] = []
    all_waiting = asyncio.Event()

    async def hold(request: httpx.Request) -> httpx.Response:
        started.append(1)
        if len(started) == 3:
            all_waiting.set()
        try:
            await asyncio.Event().wait()  # a long-poll that never answers
        except asyncio.CancelledError:
            cancelled.append(1)
            raise
        raise AssertionError("unreachable")

    worker, _, _ = make_worker(hold, CONCURRENCY="3")
    running = asyncio.create_task(worker.pull())
    async with asyncio.timeout(5):
        await all_waiting.wait()
        worker.stop.set()
        await running
    assert len(cancelled) == 3


async def test_a_fatal_error_in_one_loop_stops_them_all() -> None:
    cancelled = asyncio.Event()
    calls: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) > 1:
            return failure(401, "bad_api_key")
        try:
            await asyncio.Event().wait()  # the other loop's long-poll
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    worker, _, _ = make_worker(handler, CONCURRENCY="2")
    with pytest.raises(WorkerError, match="bad_api_key"):
        async with asyncio.timeout(5):
            await worker.pull()
    assert cancelled.is_set()
