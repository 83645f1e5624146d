"""The garbage benchmark: its hook, and its bookkeeping through a real daphne."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.common import run_async
from bench.garbage import HOOK, GarbageProbe, Measured, measure_all, report
from bench.gateway import Gateway
from bench.gc_pauses import report as pauses_report
from bench.gc_pauses import summarise
from bench.refusals import KINDS

# Five cycles, a report, then a second report: the first counts the cycles,
# the second only what came after the first (nothing of them).
CHILD = """
import json, os, signal, sys

class Marker:
    pass

for _ in range(5):
    marker = Marker()
    marker.self = marker
del marker
reports = []
for _ in range(2):
    os.kill(os.getpid(), signal.SIGUSR2)
    with open(os.environ["GARBAGE_REPORT"]) as report:
        reports.append(json.load(report).get("__main__.Marker", 0))
print(json.dumps(reports))
"""


def test_the_hook_counts_cycles_once_by_type(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(HOOK),
        "GARBAGE_REPORT": str(tmp_path / "garbage.json"),
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert json.loads(done.stdout) == [5, 0]


@pytest.mark.processes
def test_each_kind_measured_through_daphne_with_no_request_cycle() -> None:
    probe = GarbageProbe()
    try:
        probe.start()
        results = run_async(measure_all(probe, requests=5))
    finally:
        probe.close()

    expected = {
        ("POST /job", True): "HTTP 201",
        ("POST /job", False): "HTTP 401",
        ("GET /job/next", True): "HTTP 200",  # the jobs the valid posts queued
        ("GET /job/next", False): "HTTP 401",
        ("/ws handshake", True): "WS 101",
        ("/ws handshake", False): "WS 403",
    }
    assert {(r.kind, r.signed): dict(r.answers) for r in results} == {
        key: {answer: 5} for key, answer in expected.items()
    }
    for result in results:
        # What the gateway once left per request: a client's leaving raised
        # through the handler (a cycle), and a connection object per SQLite
        # peek at the queue.
        assert not any(
            name.endswith(("RequestAborted", "DatabaseWrapper"))
            for name in result.unreachable
        ), result.unreachable
    table = report(results)
    assert all(kind in table for kind in KINDS)


def test_per_request_divides_what_was_found() -> None:
    measured = Measured("POST /job", True, requests=4)
    measured.unreachable.update({"builtins.list": 6, "builtins.dict": 2})
    assert measured.per_request == 2.0
    assert "POST /job, valid" in report([measured])


@pytest.mark.processes
def test_a_daphne_process_logs_its_collections(tmp_path: Path) -> None:
    gateway = Gateway(
        access_log=False,
        extra_env={"PYTHONPATH": str(HOOK), "GC_PAUSES_DIR": str(tmp_path)},
    )
    try:
        gateway.start()
        pid = gateway.pid
        log = tmp_path / f"pauses-{pid}.jsonl"
        # The gateway's start-up collection (gateway_project.asgi) is logged
        # within the second; a file, not an event, so it is polled.
        deadline = time.monotonic() + 10
        while not (log.exists() and '"gc"' in log.read_text()):
            assert time.monotonic() < deadline, "no collection logged"
            time.sleep(0.05)
    finally:
        gateway.close()
    # Only daphne logs: not the migrate command run before it.
    assert [path.name for path in tmp_path.iterdir()] == [log.name]
    assert summarise(log)[3] != "-"  # the full collection at start-up


def test_pauses_summed_per_process(tmp_path: Path) -> None:
    events = [
        ["gc", 1.0, 0, 0.002],
        ["gc", 2.0, 0, 0.004],
        ["gc", 3.0, 2, 0.150],
        ["stall", 3.0, 0.160],
        ["stall", 4.0, 0.030],
    ]
    (tmp_path / "pauses-42.jsonl").write_text(
        "".join(json.dumps(event) + "\n" for event in events)
    )
    assert summarise(tmp_path / "pauses-42.jsonl") == [
        "42",
        "2 x, 6 ms, longest 4",
        "-",
        "1 x, 150 ms, longest 150",
        "2 / 1 / 1",
        "190",
        "160",
    ]
    assert "42" in pauses_report(tmp_path)
