"""What a request leaves for the garbage collector, by kind, valid and forged.

    python -m bench.garbage                   # 300 of each kind
    python -m bench.garbage --requests 50

CPython frees an object when its last reference goes, unless it is part of a
reference cycle: those wait for the cyclic garbage collector, whose young
collections count and trace them, and whose pauses stop the event loop. For
each kind of request, valid and forged, one client sends requests back to back
(HTTP over one kept-open connection, a new connection per handshake); before
and after, daphne (loaded with ``bench/garbage_hook``) runs a full collection
that keeps what it found unreachable and reports it by type. The gateway
answers refusals at once (``AUTH_FAILURE_DELAY_SECONDS=0``). The same hook
logs collections and event-loop stalls under any load (``bench.gc_pauses``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import websockets

from bench.common import API_KEY, Signer, format_table, machine_summary, run_async
from bench.gateway import Gateway
from bench.loadtest_http import ForgedClient
from bench.refusals import KINDS  # each kind, and its name in send()

HOOK = Path(__file__).with_name("garbage_hook")
WARM_UP = 20
REPORT_TIMEOUT = 10.0


@dataclass
class Measured:
    """One kind of request: what it was answered, and what it left unreachable."""

    kind: str
    signed: bool
    requests: int
    answers: Counter[str] = field(default_factory=Counter)
    unreachable: Counter[str] = field(default_factory=Counter)

    @property
    def label(self) -> str:
        return f"{self.kind}, {'valid' if self.signed else 'forged'}"

    @property
    def per_request(self) -> float:
        return sum(self.unreachable.values()) / self.requests


class GarbageProbe:
    """A gateway whose daphne reports its unreachable objects on request."""

    def __init__(self) -> None:
        self._scratch = Path(tempfile.mkdtemp(prefix="bench-garbage-"))
        self._report = self._scratch / "garbage.json"
        path = os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")]))
        self.gateway = Gateway(
            access_log=False,
            extra_env={
                "AUTH_FAILURE_DELAY_SECONDS": "0",
                "PYTHONPATH": path,
                "GARBAGE_REPORT": str(self._report),
            },
        )

    def start(self) -> None:
        self.gateway.start()

    def close(self) -> None:
        self.gateway.close()
        with contextlib.suppress(OSError):
            self._report.unlink()
        with contextlib.suppress(OSError):
            self._scratch.rmdir()

    def unreachable(self) -> Counter[str]:
        """Collect in daphne; what it found unreachable, by type."""
        assert self.gateway.pid is not None
        self._report.unlink(missing_ok=True)
        os.kill(self.gateway.pid, signal.SIGUSR2)
        deadline = time.monotonic() + REPORT_TIMEOUT
        while not self._report.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("daphne wrote no garbage report (is the hook on?)")
            time.sleep(0.01)  # a file, not an event: nothing to await
        return Counter(json.loads(self._report.read_text()))

    async def measure(self, kind: str, *, signed: bool, requests: int) -> Measured:
        """``requests`` of ``kind`` after a warm-up; what they left unreachable."""
        measured = Measured(kind, signed, requests)
        async with contextlib.AsyncExitStack() as stack:
            if signed:
                client: SignedClient | ForgedClient = await stack.enter_async_context(
                    SignedClient(self.gateway.base_url)
                )
            else:
                client = stack.enter_context(
                    contextlib.closing(ForgedClient(self.gateway.base_url))
                )
            for _ in range(WARM_UP):
                await client.send(KINDS[kind])
            self.unreachable()  # what came before is not this kind's
            for _ in range(requests):
                measured.answers[await client.send(KINDS[kind])] += 1
            measured.unreachable = self.unreachable()
        return measured


class SignedClient:
    """Valid requests, as a client library sends them: HTTP on one connection."""

    def __init__(self, base_url: str) -> None:
        self._signer = Signer()
        self._ws_url = base_url.replace("http://", "ws://", 1)
        self._http = httpx.AsyncClient(base_url=base_url, trust_env=False)

    async def __aenter__(self) -> SignedClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def send(self, kind: str) -> str:
        """One request of ``kind`` (``KINDS``' names): "HTTP 201", "WS 101"..."""
        if kind == "ws":
            url = f"{self._ws_url}/ws?api_key={API_KEY}"
            async with websockets.connect(url) as websocket:
                await websocket.recv()  # the hello
            return "WS 101"
        if kind == "post":
            body = {"job_id": uuid.uuid4().hex}
            response = await self._http.post(
                "/job", json=body, headers=self._signer.headers()
            )
        else:
            response = await self._http.get("/job/next", headers=self._signer.headers())
        return f"HTTP {response.status_code}"


def report(results: Sequence[Measured]) -> str:
    rows = []
    for result in results:
        common = ", ".join(
            f"{name.rsplit('.', 1)[-1]} {count:,}"
            for name, count in result.unreachable.most_common(4)
        )
        answers = ", ".join(f"{a} x{n:,}" for a, n in sorted(result.answers.items()))
        rows.append(
            [
                result.label,
                answers,
                f"{sum(result.unreachable.values()):,}",
                f"{result.per_request:.1f}",
                common or "-",
            ]
        )
    header = ["request", "answers", "unreachable", "per request", "most common"]
    return format_table(header, rows)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.garbage",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--requests", type=int, default=300, help="of each kind (300)")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    return args


async def measure_all(probe: GarbageProbe, requests: int) -> list[Measured]:
    return [
        await probe.measure(kind, signed=signed, requests=requests)
        for kind in KINDS
        for signed in (True, False)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    summary = machine_summary()
    print(f"Garbage: {args.requests:,} requests of each kind, one client.\n{summary}")
    probe = GarbageProbe()
    try:
        probe.start()
        results = run_async(measure_all(probe, args.requests))
    finally:
        probe.close()
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
