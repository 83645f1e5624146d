"""The load test's bookkeeping (bench/loadtest*.py): it must see every loss.

A load test that reports "zero lost, zero duplicated" is only worth its
accounting, so each check here drops, repeats or delays a frame on purpose and
asserts that the tally notices. One short run through a real daphne checks that
real frames and pulls are matched job by job, and one through two daphne
processes on Redis that the load is shared; one with the flood in turns that
the flood pauses and each side is tallied apart. No timing is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import time

import httpx
import pytest

from bench import loadtest_http
from bench.common import API_KEY, Signer
from bench.fanout_client import Publication
from bench.loadtest import (
    FLOOD_RAMP,
    Load,
    Stack,
    build_stacks,
    compare_sides,
    load_of,
    parse_args,
    phases_of,
    run_phase,
    side_of,
)
from bench.loadtest_http import FloodReport, tally_workers
from bench.loadtest_ws import LoadClient, LoadPool, Receipt, job_name, tally_ws

PREFIX = "load-test-abc123"
JOBS = 5
CLIENTS = 3


def frame(number: int, *, prefix: str = PREFIX, compact: bool = True) -> bytes:
    """A job frame as the gateway's fan-out hub writes it."""
    message = {
        "type": "job",
        "job": {
            "id": 100 + number,
            "job_id": job_name(prefix, number),
            "channel": "api",
            "fields": {"sent_at": "0"},
        },
    }
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(message, separators=separators).encode()


def sent_times() -> list[float]:
    return [1000.0 + n for n in range(JOBS)]


def receipts_with_every_frame() -> list[Receipt]:
    """Every client got every job, 0.25 s after it was sent."""
    receipts = [Receipt(PREFIX, JOBS) for _ in range(CLIENTS)]
    for receipt in receipts:
        for number, sent in enumerate(sent_times()):
            assert receipt.record(sent + 0.25, frame(number))
    return receipts


def test_complete_delivery_is_counted_exactly() -> None:
    tally = tally_ws(receipts_with_every_frame(), sent_times(), expected=range(JOBS))

    assert tally.ok
    assert (tally.clients, tally.expected, tally.delivered) == (3, 15, 15)
    assert (tally.missing, tally.duplicated, tally.unexpected) == (0, 0, 0)
    assert tally.jobs_to_all == JOBS
    assert tally.latencies_ms == [pytest.approx(250.0)] * 15


def test_a_dropped_frame_is_lost() -> None:
    receipts = [Receipt(PREFIX, JOBS) for _ in range(CLIENTS)]
    for index, receipt in enumerate(receipts):
        for number, sent in enumerate(sent_times()):
            if (index, number) == (1, 3):
                continue  # dropped on purpose
            receipt.record(sent + 0.25, frame(number))

    tally = tally_ws(receipts, sent_times(), expected=range(JOBS))

    assert not tally.ok
    assert (tally.delivered, tally.missing, tally.late) == (14, 1, 0)
    assert (tally.jobs_to_all, tally.jobs_to_some, tally.jobs_to_none) == (4, 1, 0)


def test_a_job_dropped_before_the_fan_out_reaches_no_client() -> None:
    receipts = [Receipt(PREFIX, JOBS) for _ in range(CLIENTS)]
    for receipt in receipts:
        for number, sent in enumerate(sent_times()):
            if number != 2:
                receipt.record(sent + 0.25, frame(number))

    tally = tally_ws(receipts, sent_times(), expected=range(JOBS))

    assert tally.missing == CLIENTS
    assert tally.jobs_to_none == 1


def test_a_repeated_frame_is_a_duplicate_and_keeps_the_first_arrival() -> None:
    receipts = receipts_with_every_frame()
    assert not receipts[0].record(5000.0, frame(4))

    tally = tally_ws(receipts, sent_times(), expected=range(JOBS))

    assert not tally.ok
    assert (tally.delivered, tally.missing, tally.duplicated) == (15, 0, 1)
    assert max(tally.latencies_ms) == pytest.approx(250.0)


def test_a_frame_after_the_wait_is_late_and_counts_as_lost() -> None:
    receipts = receipts_with_every_frame()
    receipts[2].arrivals[4] = 9999.0

    tally = tally_ws(receipts, sent_times(), expected=range(JOBS), until=2000.0)

    assert not tally.ok
    assert (tally.delivered, tally.missing, tally.late) == (14, 1, 1)


def test_refused_and_foreign_jobs_are_unexpected_uncertain_ones_are_not() -> None:
    receipts = receipts_with_every_frame()
    receipts[0].record(1000.5, frame(0, prefix="load-other-ffffff"))

    # Job 3 was refused (never expected), job 4 got no answer (uncertain).
    tally = tally_ws(
        receipts, sent_times(), expected=[0, 1, 2], uncertain=[4], until=math.inf
    )

    assert tally.unexpected == CLIENTS + 1  # job 3 at every client, plus the foreign
    assert (tally.expected, tally.missing) == (9, 0)


def test_frames_that_are_not_jobs_are_set_aside() -> None:
    receipt = Receipt(PREFIX, JOBS)
    assert not receipt.record(1.0, b'{"type": "pong", "server_time": 1.0}')
    assert receipt.record(1.0, frame(1, compact=False))  # spaces after colons
    assert not receipt.record(1.0, frame(JOBS))  # beyond the phase's jobs
    assert (receipt.other, receipt.foreign) == (1, 1)


def test_every_job_of_a_batched_frame_is_filed() -> None:
    receipt = Receipt(PREFIX, JOBS)
    jobs = [json.loads(frame(number))["job"] for number in (0, 1, 2)]
    batched = json.dumps({"type": "jobs", "jobs": jobs}).encode()
    assert receipt.record(1.0, batched) == 3
    assert receipt.record(2.0, frame(1)) == 0  # already in the batch
    assert receipt.duplicated == 1
    assert [receipt.arrivals[n] for n in range(3)] == [1.0, 1.0, 1.0]
    assert math.isnan(receipt.arrivals[3])


def test_a_fragmented_frame_is_reassembled_by_the_client() -> None:
    """The client's own frame parsing: hello, then a job in two fragments."""

    async def feed() -> LoadClient:
        pool = LoadPool("127.0.0.1", 1, prefix=PREFIX, jobs=JOBS, batch=False)
        client = LoadClient("127.0.0.1:1", "/ws", pool, wait_for_hello=True)
        client._upgraded = True
        hello = b'{"type":"hello","server_time":1.0,"last_id":null}'
        payload = frame(2)
        first, rest = payload[:10], payload[10:]
        data = (
            bytes([0x81, len(hello)]) + hello
            # A text frame without FIN, then its continuation with FIN.
            + bytes([0x01, len(first)]) + first
            + bytes([0x80, 126]) + len(rest).to_bytes(2, "big") + rest
        )  # fmt: skip
        client.data_received(data)
        assert client.ready.done()
        assert pool.first_arrivals == 1
        return client

    client = asyncio.run(feed())
    assert not math.isnan(client.receipt.arrivals[2])
    assert client.receipt.other == 1  # the hello


def test_workers_each_job_once() -> None:
    sent = {f"job-{n}": 100.0 + n for n in range(4)}
    claims = [(f"job-{n}", 100.5 + n, n % 2) for n in range(4)]

    tally = tally_workers(claims, sent, expected=sent)

    assert tally.ok
    assert (tally.pulled, tally.missing, tally.duplicated) == (4, 0, 0)
    assert tally.latencies_ms == [pytest.approx(500.0)] * 4


def test_workers_a_job_pulled_twice_or_never_is_caught() -> None:
    sent = {f"job-{n}": 100.0 + n for n in range(4)}
    claims = [
        ("job-0", 100.5, 0),
        ("job-1", 101.5, 1),
        ("job-1", 101.6, 0),  # handed out twice, to two workers
        ("job-2", 900.0, 1),  # after the wait: late
        ("job-9", 104.0, 0),  # never published
    ]

    tally = tally_workers(claims, sent, expected=sent, until=500.0, leftovers=["job-3"])

    assert not tally.ok
    assert tally.pulled == 2
    # job-2 pulled after the wait, job-3 found still queued: both lost, late.
    assert (tally.missing, tally.late) == (2, 2)
    assert (tally.duplicated, tally.unexpected) == (1, 1)


def turns_load(**overrides: object) -> Load:
    settings: dict[str, object] = {
        "clients": 4,
        "workers": 2,
        "rate": 10.0,
        "duration": 8.0,
        "wait": 2.0,
        "client_procs": 1,
        "batch": True,
        "flood": True,
        "flood_concurrency": 2,
        "flood_rate": 0.0,
        "drain_timeout": 30.0,
        "turns": 4,
    }
    settings.update(overrides)
    return Load(**settings)  # type: ignore[arg-type]


def test_the_flood_takes_turns_off_on_on_off_and_each_turn_settles_first() -> None:
    load = turns_load()  # four turns of 2 s; the first 0.5 s of each left out
    assert load.turn_seconds == 2.0
    sides = [load.flooded_at(offset) for offset in (0.6, 2.6, 4.6, 6.6)]
    assert sides == [False, True, True, False]
    for settling in (0.0, 0.4, 2.1, 6.4):
        assert load.flooded_at(settling) is None
    assert load.flooded_at(-0.1) is None
    assert load.flooded_at(8.1) is None
    # Without turns, the whole phase is one side.
    assert turns_load(turns=0).flooded_at(3.0) is True
    assert turns_load(turns=0, flood=False).flooded_at(3.0) is False


def test_a_side_counts_only_its_own_jobs_and_every_loss_as_infinite() -> None:
    names = [job_name(PREFIX, n) for n in range(JOBS)]
    slots = {name: n for n, name in enumerate(names)}
    publication = Publication(
        sent_at=dict(zip(names, sent_times(), strict=True)),
        accepted=set(names[:4]),
        unanswered={names[4]},
        answer_ms={name: 10.0 * (n + 1) for n, name in enumerate(names[:4])},
    )
    receipts = receipts_with_every_frame()
    claims = [
        (name, sent + 0.5, 0) for name, sent in zip(names, sent_times(), strict=True)
    ]

    mine = side_of(names[:2], slots, publication, receipts, claims, until=math.inf)
    assert (mine.jobs_posted, mine.jobs_accepted) == (2, 2)
    assert (mine.ws_p50_ms, mine.ws_p99_ms) == (250.0, 250.0)
    assert (mine.pull_p50_ms, mine.pull_p99_ms) == (500.0, 500.0)
    assert (mine.post_p50_ms, mine.post_p99_ms) == (10.0, 20.0)

    # Job 2 never reached the first client, job 3 no worker, job 4 no answer.
    receipts[0].arrivals[2] = math.nan
    theirs = side_of(
        names[2:], slots, publication, receipts, claims[:3], until=math.inf
    )
    assert (theirs.jobs_posted, theirs.jobs_accepted) == (3, 2)
    assert theirs.ws_p99_ms == math.inf
    assert theirs.pull_p99_ms == math.inf
    assert theirs.post_p99_ms == math.inf
    assert theirs.accepted_share == pytest.approx(2 / 3)


def test_a_short_phase_with_the_flood_in_turns_tallies_each_side() -> None:
    """A real flood, paused and resumed on schedule, against a real daphne."""
    from bench.gateway import Gateway

    gateway = Gateway(access_log=False)
    load = turns_load(duration=2.0)  # turns of 0.5 s
    try:
        gateway.start()
        stack = Stack("embedded", "SQLite + in-memory channel layer", [gateway])
        result = asyncio.run(run_phase(stack, load, "flood in turns"))
    finally:
        gateway.close()

    assert result.jobs_accepted == 20
    assert not result.lost_or_duplicated
    on, off = result.flood_on, result.flood_off
    assert on is not None and off is not None
    # Two turns a side of 5 jobs each, less those posted while the turn
    # settled (its first 0.125 s: one job, or two when the posts run early).
    for side in (on, off):
        assert 6 <= side.jobs_posted <= 8
        assert side.jobs_accepted == side.jobs_posted
    # Every job in on both sides: each figure compares, turn against turn.
    checks = compare_sides(result)
    assert len(checks) == 6
    assert all(check.ratio is not None for check in checks)
    flood = result.flood
    assert flood is not None
    assert flood["admitted"] == 0 and flood["requests"]
    # Flooding all along would have lasted the ramp, the publishing and the
    # wait for delivery; paused for half the turns and from the last turn on,
    # it flooded for the ramp and two turns.
    flooded = flood["seconds"]
    assert isinstance(flooded, float)
    assert flooded < FLOOD_RAMP + load.duration


async def test_the_floods_connections_start_spread_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # All at once, each start (and resume) of the flood would be a wave.
    connections, spread = 16, 0.4
    loop = asyncio.get_running_loop()
    first_sends: list[float] = []
    all_sent = asyncio.Event()

    class StandIn:
        def __init__(self, base_url: str) -> None:
            pass

        async def send(self, kind: str) -> str:
            first_sends.append(loop.time())
            if len(first_sends) == connections:
                all_sent.set()
            await asyncio.sleep(1.0)  # a held refusal: nobody sends twice meanwhile
            return "HTTP 401"

        def close(self) -> None:
            pass

    monkeypatch.setattr(loadtest_http, "ForgedClient", StandIn)
    ours, theirs = multiprocessing.Pipe()
    started = loop.time()
    flood = asyncio.create_task(
        loadtest_http._flood(theirs, ["http://unused"], connections, 0.0, spread)
    )
    await asyncio.wait_for(all_sent.wait(), 10)
    ours.send("stop")
    await asyncio.wait_for(flood, 10)
    assert ours.recv() == "started"
    report = ours.recv()
    assert isinstance(report, FloodReport)
    assert report.answers == {"HTTP 401": connections}
    offsets = [sent - started for sent in first_sends]
    assert max(offsets) < spread + 0.5
    # Sixteen random moments within 0.4 s all fall within 0.1 s about once
    # in 10^8 runs.
    assert max(offsets) - min(offsets) > spread / 4
    ours.close()
    theirs.close()


class RecordingServer:
    """Refuses every request (401; a handshake 403); notes connections and requests.

    ``sized`` False answers without a ``Content-Length`` and closes, as an
    HTTP/1.0 server does.
    """

    def __init__(self, *, sized: bool = True) -> None:
        self.sized = sized
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc_info: object) -> None:
        self.server.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                request_line, *lines = (
                    (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
                )
                headers = dict(line.split(": ", 1) for line in lines if ": " in line)
                body = await reader.readexactly(int(headers.get("Content-Length", 0)))
                self.requests.append((request_line, headers, body))
                websocket = headers.get("Upgrade") == "websocket"
                status = b"403 Forbidden" if websocket else b"401 Unauthorized"
                answer = b'{"error": "forged"}'
                if self.sized and not websocket:
                    head = b"Content-Length: %d\r\n" % len(answer)
                    writer.write(b"HTTP/1.1 %s\r\n%s\r\n%s" % (status, head, answer))
                else:
                    writer.write(b"HTTP/1.1 %s\r\n\r\n%s" % (status, answer))
                    writer.close()
                    return
                await writer.drain()
        writer.close()


async def test_forged_requests_share_a_connection_handshakes_take_one_each() -> None:
    server = RecordingServer()
    async with server as base_url:
        client = loadtest_http.ForgedClient(base_url)
        answers = [await client.send(kind) for kind in ("post", "next", "post")]
        assert answers == ["HTTP 401"] * 3
        assert server.connections == 1
        assert [await client.send("ws") for _ in range(2)] == ["WS 403"] * 2
        assert server.connections == 3
        client.close()
    lines = [line for line, _, _ in server.requests]
    assert lines[:3] == [
        "POST /job HTTP/1.1",
        "GET /job/next?wait=10 HTTP/1.1",
        "POST /job HTTP/1.1",
    ]
    assert all(line.startswith("GET /ws?api_key=forged-") for line in lines[3:])
    for line, headers, body in server.requests[:3]:
        # The right key, a fresh timestamp, a signature that cannot match.
        assert headers["X-API-KEY"] == API_KEY
        assert abs(int(headers["X-TIMESTAMP"]) - time.time()) < 60
        assert len(headers["X-SIGNATURE"]) == 64
        assert headers["Host"] == base_url.removeprefix("http://")
        if line.startswith("POST"):
            assert headers["Content-Type"] == "application/json"
            assert json.loads(body)["job_id"].startswith("forged-")
    _, handshake, _ = server.requests[3]
    assert handshake["Sec-WebSocket-Version"] == "13"
    assert "X-API-KEY" not in handshake


async def test_an_answer_without_a_length_ends_with_its_connection() -> None:
    server = RecordingServer(sized=False)
    async with server as base_url:
        client = loadtest_http.ForgedClient(base_url)
        assert [await client.send("post") for _ in range(2)] == ["HTTP 401"] * 2
        client.close()
    # The body was read to the end of the connection; the next request
    # opened another.
    assert server.connections == 2


async def test_a_garbled_answer_or_a_closed_port_is_an_error_the_flood_counts() -> None:
    async def garble(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"nonsense\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garble, "127.0.0.1", 0)
    base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    with pytest.raises(loadtest_http.FORGED_SEND_ERRORS, match="not an HTTP answer"):
        await loadtest_http.ForgedClient(base_url).send("post")
    server.close()
    await server.wait_closed()
    with pytest.raises(loadtest_http.FORGED_SEND_ERRORS):
        await loadtest_http.ForgedClient(base_url).send("next")


def test_quick_is_a_small_run() -> None:
    args = parse_args(["--quick"])
    assert (args.clients, args.workers, args.duration) == (100, 10, 10.0)
    with pytest.raises(SystemExit):
        parse_args(["--wait", "31"])


def test_phases_run_in_order_and_turns_only_runs_the_turns_alone() -> None:
    def names(*argv: str) -> list[str]:
        return [name for name, _, _ in phases_of(parse_args(["--quick", *argv]))]

    assert names() == ["no flood", "flood", "flood in turns"]
    assert names("--turns", "0") == ["no flood", "flood"]
    assert names("--no-flood") == ["no flood"]
    assert phases_of(parse_args(["--turns-only", "--turns", "16"])) == [
        ("flood in turns", True, 16)
    ]
    for contradiction in (["--no-flood"], ["--turns", "0"]):
        with pytest.raises(SystemExit):
            parse_args(["--turns-only", *contradiction])


def test_settings_reach_every_daphne_process() -> None:
    argv = ["--quick", "--redis", "--no-postgres", "--processes", "2"]
    argv += ["--set", "AUTH_FAILURE_MAX_DELAY_SECONDS=1", "--set", "LOG_LEVEL=INFO"]
    with contextlib.ExitStack() as exits:
        stacks = build_stacks(parse_args(argv), exits)
    gateways = [gateway for stack in stacks for gateway in stack.gateways]
    assert len(gateways) == 3
    for gateway in gateways:
        assert (
            gateway.extra_env.items()
            >= {
                "AUTH_FAILURE_MAX_DELAY_SECONDS": "1",
                "LOG_LEVEL": "INFO",
            }.items()
        )
    for malformed in ("AUTH_FAILURE_MAX_DELAY_SECONDS", "lower=1", "=1"):
        with pytest.raises(SystemExit):
            parse_args(["--set", malformed])


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "one-per-frame"])
def test_a_short_phase_through_daphne_counts_every_frame_and_pull(
    batch: bool,
) -> None:
    """Real clients, workers and publisher against a real daphne: all accounted."""
    from bench.gateway import Gateway

    gateway = Gateway(access_log=False)
    try:
        gateway.start()
        stack = Stack("embedded", "SQLite + in-memory channel layer", [gateway])
        load = Load(
            clients=4,
            workers=2,
            rate=10.0,
            duration=1.0,
            wait=2.0,
            client_procs=1,
            batch=batch,
            flood=False,
            flood_concurrency=1,
            flood_rate=0.0,
            drain_timeout=30.0,
        )
        result = asyncio.run(run_phase(stack, load, "smoke"))
    finally:
        gateway.close()

    assert result.connected == 4
    assert result.jobs_accepted == 10
    assert (result.ws_expected, result.ws_delivered) == (40, 40)
    assert result.pulled == 10
    assert not result.lost_or_duplicated
    assert result.left_in_queue == 0
    assert result.wait_ended == "complete"


def _counters(base_url: str) -> dict[str, float]:
    """This daphne process's own counters, from its ``/metrics``."""
    answer = httpx.get(base_url + "/metrics", headers=Signer().headers())
    answer.raise_for_status()
    counters = {}
    for line in answer.text.splitlines():
        name, _, value = line.partition(" ")
        if name in (
            "gateway_jobs_published_total",
            "gateway_delivery_latency_seconds_count",
        ):
            counters[name] = float(value)
    return counters


def test_two_daphne_processes_on_redis_share_the_load_and_lose_nothing() -> None:
    """``--processes 2``: posts, clients and workers on both; all accounted."""
    stack_args = ["--redis", "--no-embedded", "--no-postgres", "--processes", "2"]
    load_args = ["--clients", "4", "--workers", "2", "--rate", "10", "--duration", "1"]
    args = parse_args([*stack_args, *load_args, "--wait", "2"])
    with contextlib.ExitStack() as exits:
        [stack] = build_stacks(args, exits)
        exits.callback(stack.close)
        stack.start()
        result = asyncio.run(run_phase(stack, load_of(args, flood=False), "smoke"))
        counters = [_counters(url) for url in stack.base_urls]

    assert result.processes == 2
    assert result.connected == 4
    assert result.jobs_accepted == 10
    assert (result.ws_expected, result.ws_delivered) == (40, 40)
    assert result.pulled == 10
    assert not result.lost_or_duplicated
    for own in counters:
        # The posts took turns; each process pushed every job to its own
        # clients (its first delivery of each), wherever the job was posted.
        assert own == {
            "gateway_jobs_published_total": 5.0,
            "gateway_delivery_latency_seconds_count": 10.0,
        }
