"""The Roblox reference client, run in a real Luau VM against real HTTP servers.

The VM and the engine services it needs come from ``tests/luau_vm.py``. Happy
paths and the signing checks run against ``live_gateway``; rate limiting, odd
answers, a dead server and the polling loop's timing run against a small
scripted server in this module, which can say exactly what the test needs.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from gateway_client import signing
from gateway_client.signing import signed_headers, verify_request
from testkit.servers import DaphneProcess
from tests.conftest import process_env
from tests.luau_vm import HttpCall, LuauVM
from tests.stack import API_KEY, HMAC_SECRET

LOOPBACK = "127.0.0.1"


# --- The VM -------------------------------------------------------------------


@pytest.fixture
def vm() -> Iterator[LuauVM]:
    """A fresh VM with the module loaded as the global ``JobGateway``."""
    with LuauVM() as machine:
        machine.load_gateway()
        yield machine
        # An error that escaped a task would only have been printed in Roblox.
        assert machine.task_errors == []


def connect(vm: LuauVM, base_url: str, api_key: str, hmac_secret: str) -> None:
    """Create the global ``gw`` client in the VM."""
    config = {"baseUrl": base_url, "apiKey": api_key, "hmacSecret": hmac_secret}
    vm.run("gw = JobGateway.new(...)", config)


def unique_job_id() -> str:
    return "roblox-" + uuid.uuid4().hex


# --- SHA-256 and HMAC-SHA256 ------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "digest"),
    [
        ("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        ("abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        (
            "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        ),
        (
            "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmn"
            "hijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
            "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1",
        ),
    ],
    ids=["empty", "abc", "448-bit", "896-bit"],
)
def test_sha256_nist_vectors(vm: LuauVM, message: str, digest: str) -> None:
    assert vm.run("return JobGateway.sha256(...)", message) == [digest]


def test_sha256_of_a_million_a(vm: LuauVM) -> None:
    # Over 15,000 blocks: the 64-bit length and long carries are exercised.
    (digest,) = vm.run('return JobGateway.sha256(string.rep("a", 1000000))')
    assert digest == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"


def test_sha256_matches_hashlib_around_block_boundaries(vm: LuauVM) -> None:
    rng = random.Random(180_4)
    messages = [rng.randbytes(length) for length in range(0, 200)]
    digests = vm.run(
        """
        local out = {}
        for i, message in ... do
            out[i] = JobGateway.sha256(message)
        end
        return out
        """,
        messages,
    )[0]
    assert digests == [hashlib.sha256(m).hexdigest() for m in messages]


RFC_4231 = [
    (
        bytes([0x0B] * 20),
        b"Hi There",
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
    ),
    (
        b"Jefe",
        b"what do ya want for nothing?",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    ),
    (
        bytes([0xAA] * 20),
        bytes([0xDD] * 50),
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
    ),
    (
        bytes(range(1, 26)),
        bytes([0xCD] * 50),
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
    ),
    # Case 5: the RFC gives only the first 128 bits.
    (bytes([0x0C] * 20), b"Test With Truncation", "a3b6167473100ee06e0c796c2955552b"),
    (
        bytes([0xAA] * 131),
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    ),
    (
        bytes([0xAA] * 131),
        b"This is a test using a larger than block-size key and a larger than "
        b"block-size data. The key needs to be hashed before being used by the "
        b"HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
    ),
]


@pytest.mark.parametrize(
    ("key", "message", "expected"), RFC_4231, ids=[f"case-{i}" for i in range(1, 8)]
)
def test_hmac_sha256_rfc_4231(
    vm: LuauVM, key: bytes, message: bytes, expected: str
) -> None:
    (mac,) = vm.run("return JobGateway.hmacSha256(...)", key, message)
    assert len(mac) == 64
    assert mac[: len(expected)] == expected


def test_hmac_sha256_matches_python_on_random_pairs(vm: LuauVM) -> None:
    rng = random.Random(4231)
    pairs = [
        (rng.randbytes(rng.randint(0, 200)), rng.randbytes(rng.randint(0, 300)))
        for _ in range(200)
    ]
    macs = vm.run(
        """
        local keys, messages = ...
        local out = {}
        for i, key in keys do
            out[i] = JobGateway.hmacSha256(key, messages[i])
        end
        return out
        """,
        [key for key, _ in pairs],
        [message for _, message in pairs],
    )[0]
    expected = [hmac.new(k, m, hashlib.sha256).hexdigest() for k, m in pairs]
    assert macs == expected


CONTRACT_SIGNATURE = "f8afe52f00412804c44da62e42276be610568f7865d5f630f4b46c9923f3e15d"


def test_signing_follows_the_contract_test_vector(vm: LuauVM) -> None:
    assert vm.run(
        """
        local gw = JobGateway.new({
            baseUrl = "http://127.0.0.1:9", apiKey = "key",
            hmacSecret = "another-secret",
            clock = function() return 1700000000 end,
        })
        return JobGateway.sign("another-secret", "1700000000"),
            JobGateway.sign("another-secret", 1700000000),
            gw:SignedHeaders()
        """
    ) == [
        CONTRACT_SIGNATURE,
        CONTRACT_SIGNATURE,
        {
            "X-API-KEY": "key",
            "X-TIMESTAMP": "1700000000",
            "X-SIGNATURE": CONTRACT_SIGNATURE,
        },
    ]


# The engine's Random, made predictable: NextInteger counts 1, 2, 3...
COUNTING_RANDOM = """
Random = {new = function()
    local n = 0
    return {NextInteger = function(_, low, high)
        n += 1
        return low + n % (high - low + 1)
    end}
end}
"""
COUNTED_NONCE = "".join(f"{n:02x}" for n in range(1, 17))

V2_CASES = [
    (
        "another-secret",
        "1700000000",
        "000102030405060708090a0b0c0d0e0f",
        "POST",
        "/job",
        b'{"job_id":"abc"}',
    ),
    ("s", "1700000000", "ab" * 20, "GET", "/job/next?wait=25", b""),
    ("s", "-5", "AB" * 16, "get", "/gw/health?a=%20b&c", b""),
    ("k\x00\xff" * 30, "1", "0f" * 64, "POST", "/job", "é🔑".encode() * 100),
]


def test_signature_v2_matches_python_for_fixed_inputs(vm: LuauVM) -> None:
    results = vm.run(
        """
        local out = {}
        for i, case in ... do
            out[i] = JobGateway.signV2(table.unpack(case))
        end
        return out
        """,
        [list(case) for case in V2_CASES],
    )[0]
    assert results == [signing.sign_v2(*case) for case in V2_CASES]
    # The documented test vector.
    assert results[0] == (
        "b935c27945e69642f89a17abc794081e6d8fb9e228a479fde7dd4bcc393931d5"
    )


def test_signed_headers_v2_equal_pythons_for_the_same_nonce(vm: LuauVM) -> None:
    vm.run(COUNTING_RANDOM)
    (headers,) = vm.run(
        """
        local gw = JobGateway.new({
            baseUrl = "https://jobs.example.com/gateway/", apiKey = "key",
            hmacSecret = "another-secret",
            clock = function() return 1700000000.7 end,
        })
        return gw:SignedHeaders("POST", "/gateway/job", '{"job_id":"abc"}')
        """
    )
    assert headers == signing.signed_headers_v2(
        "key",
        "another-secret",
        method="POST",
        target="/gateway/job",
        body=b'{"job_id":"abc"}',
        now=1_700_000_000,
        nonce=COUNTED_NONCE,
    )


def test_every_request_draws_a_new_nonce_from_random(vm: LuauVM) -> None:
    with ScriptedServer([Canned(204)]) as server:
        connect(vm, server.base_url + "/prefix", "k", "s")
        vm.run("for _ = 1, 20 do gw:NextJob(0) end")
    nonces = [call.headers["X-NONCE"] for call in vm.requests]
    assert len(set(nonces)) == 20
    assert all(re.fullmatch(r"[0-9a-f]{32}", nonce) for nonce in nonces)
    # The base URL's own path is part of the signed target.
    call = vm.requests[0]
    assert server.paths[0] == "/prefix/job/next?wait=0"
    verify_request(
        call.headers,
        method="GET",
        target="/prefix/job/next?wait=0",
        api_keys=["k"],
        secrets=["s"],
        require_v2=True,
    )


def test_signature_version_1_is_still_available(vm: LuauVM) -> None:
    with ScriptedServer([Canned(204)]) as server:
        vm.run(
            "JobGateway.new(...):NextJob(0)",
            {
                "baseUrl": server.base_url,
                "apiKey": "k",
                "hmacSecret": "s",
                "signatureVersion": 1,
            },
        )
    (call,) = vm.requests
    assert set(call.headers) == {"X-API-KEY", "X-TIMESTAMP", "X-SIGNATURE"}
    assert call.headers["X-SIGNATURE"] == signing.sign("s", call.headers["X-TIMESTAMP"])


# --- Configuration ----------------------------------------------------------------


def test_refuses_to_run_on_a_players_client() -> None:
    with LuauVM(is_client=True) as machine:
        machine.load_gateway()
        with pytest.raises(RuntimeError, match="server only"):
            machine.run(
                "JobGateway.new({baseUrl = 'https://x', apiKey = 'k',"
                " hmacSecret = 's'})"
            )


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ('{apiKey = "k", hmacSecret = "s"}', "baseUrl"),
        ('{baseUrl = "ftp://x", apiKey = "k", hmacSecret = "s"}', "baseUrl"),
        ('{baseUrl = "https://x", hmacSecret = "s"}', "apiKey"),
        ('{baseUrl = "https://x", apiKey = "k", hmacSecret = ""}', "hmacSecret"),
        ('{baseUrl = "https://x", apiKey = "k", hmacSecret = "s", clock = 5}', "clock"),
        (
            '{baseUrl = "https://x", apiKey = "k", hmacSecret = "s",'
            " signatureVersion = 3}",
            "signatureVersion",
        ),
    ],
)
def test_new_raises_on_a_configuration_mistake(
    vm: LuauVM, config: str, complaint: str
) -> None:
    with pytest.raises(RuntimeError, match=complaint):
        vm.run(f"JobGateway.new({config})")


# --- A scripted server (permanent: for what a real gateway will not do on cue) ---


@dataclass
class Canned:
    """One scripted answer."""

    status: int
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)


def canned_json(status: int, payload: Any, **headers: str) -> Canned:
    all_headers = {"Content-Type": "application/json", **headers}
    return Canned(status, json.dumps(payload), all_headers)


def canned_error(status: int, code: str, **headers: str) -> Canned:
    return canned_json(
        status, {"error": code, "detail": f"Scripted {code}."}, **headers
    )


class ScriptedServer:
    """Answers requests with the scripted answers in order, then the last again."""

    def __init__(self, script: list[Canned]) -> None:
        self.script = list(script)
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                server.paths.append(self.path)
                canned = (
                    server.script.pop(0) if len(server.script) > 1 else server.script[0]
                )
                self.send_response(canned.status)
                for name, value in canned.headers.items():
                    self.send_header(name, value)
                body = canned.body.encode()
                if canned.status != 204:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if canned.status != 204:
                    self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.base_url = f"http://{LOOPBACK}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=lambda: self._httpd.serve_forever(poll_interval=0.05),
            daemon=True,
        )

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


JOB = {"id": 7, "job_id": "abc-123", "place_id": 109983668079237, "fields": {}}


@pytest.mark.parametrize(
    ("answer", "code", "retry_after"),
    [
        (canned_error(429, "rate_limited", **{"Retry-After": "7"}), "rate_limited", 7),
        (Canned(429, "", {"retry-after": "3"}), "rate_limited", 3),
        (canned_error(503, "unavailable"), "unavailable", None),
        (Canned(502, "<html>Bad Gateway</html>"), "http_error", None),
    ],
    ids=["429-json", "429-bare", "503", "502-html"],
)
def test_error_answers_become_error_tables(
    vm: LuauVM, answer: Canned, code: str, retry_after: int | None
) -> None:
    with ScriptedServer([answer]) as server:
        connect(vm, server.base_url, "k", "s")
        ok, err = vm.run("return gw:NextJob(0)")
    assert ok is None
    assert err["code"] == code
    assert err["status"] == answer.status
    assert err.get("retryAfter") == retry_after
    assert err["detail"]


def test_a_success_that_is_not_json_is_bad_response(vm: LuauVM) -> None:
    with ScriptedServer([Canned(200, "<html>captive portal</html>")]) as server:
        connect(vm, server.base_url, "k", "s")
        results = vm.run(
            """
            local a, errA = gw:Health()
            local b, errB = gw:NextJob(0)
            return a, errA.code, b, errB.code
            """
        )
    assert results == [None, "bad_response", None, "bad_response"]


def test_next_job_clamps_the_wait_to_the_contract_range(vm: LuauVM) -> None:
    with ScriptedServer([Canned(204)]) as server:
        connect(vm, server.base_url, "k", "s")
        results = vm.run(
            """
            local a = gw:NextJob(99)
            local b = gw:NextJob(-3)
            local c = gw:NextJob(2.7)
            local d = gw:NextJob()
            local bad, err = gw:NextJob("soon")
            return a, b, c, d, bad, err.code
            """
        )
    assert results == [True, True, True, True, None, "bad_argument"]
    assert server.paths == [f"/job/next?wait={s}" for s in (30, 0, 2, 0)]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    return f"http://{LOOPBACK}:{port}"


def test_a_dead_server_is_a_network_error_not_a_throw(vm: LuauVM) -> None:
    connect(vm, closed_port_url(), "k", "s")
    # vm.run raises if anything is thrown out of the client.
    results = vm.run(
        """
        local out = {}
        for _, call in {
            function() return gw:NextJob(5) end,
            function() return gw:Publish({job_id = "x"}) end,
            function() return gw:Health() end,
        } do
            local ok, err = call()
            table.insert(out, {ok = ok, code = err.code, status = err.status,
                detail = err.detail, text = tostring(err)})
        end
        return out
        """
    )[0]
    assert len(results) == 3
    for result in results:
        assert "ok" not in result and "status" not in result
        assert result["code"] == "network_error"
        assert "ConnectFail" in result["detail"]
        assert result["text"].startswith("JobGateway network_error: ")


def test_publish_refuses_a_job_that_cannot_be_encoded(vm: LuauVM) -> None:
    connect(vm, closed_port_url(), "k", "s")
    results = vm.run(
        """
        local a, errA = gw:Publish("not a table")
        local b, errB = gw:Publish({job_id = "x", fields = {1, {a = print}}})
        return a, errA.code, b, errB.code
        """
    )
    assert results == [None, "bad_argument", None, "bad_argument"]
    assert vm.requests == []


# --- The polling loop, on the virtual clock ------------------------------------------


LOOP = """
local options = ...
log = {jobs = {}, errors = {}, stops = {}}
options.onError = function(err, retryIn)
    table.insert(log.errors, {code = err.code, retryIn = retryIn or false})
    if options.stopAfterErrors and #log.errors >= options.stopAfterErrors then
        handle:Stop()
    end
end
options.onStop = function(reason, err)
    table.insert(log.stops, {reason = reason, code = err and err.code or false})
end
if options.fixedRandom then
    local value = options.fixedRandom
    options.random = function() return value end
end
handle = gw:Run(function(job)
    table.insert(log.jobs, job.job_id)
    if job.job_id == options.failOn then
        error("the game could not use this job")
    end
    if options.stopOnJob then
        handle:Stop()
    end
end, options)
"""


def read_log(vm: LuauVM) -> dict[str, Any]:
    (log,) = vm.run("return log")
    # An empty Luau table converts to {}.
    return {key: log.get(key) or [] for key in ("jobs", "errors", "stops")}


def request_times(vm: LuauVM) -> list[float]:
    return [call.at for call in vm.requests]


def test_run_backs_off_honours_retry_after_and_stops_on_401(vm: LuauVM) -> None:
    script = [
        canned_error(503, "unavailable"),
        canned_error(503, "unavailable"),
        canned_json(200, {"job": JOB}),
        Canned(204),
        canned_error(429, "rate_limited", **{"Retry-After": "7"}),
        canned_error(401, "bad_api_key"),
    ]
    with ScriptedServer(script) as server:
        connect(vm, server.base_url, "k", "s")
        vm.run(LOOP, {"fixedRandom": 0.5})
        vm.run_tasks()
    assert read_log(vm) == {
        "jobs": ["abc-123"],
        # Equal jitter at 0.5: three quarters of 1 s, then of 2 s; the success
        # resets the count, and the 429's Retry-After outweighs 0.75 s.
        "errors": [
            {"code": "unavailable", "retryIn": 0.75},
            {"code": "unavailable", "retryIn": 1.5},
            {"code": "rate_limited", "retryIn": 7},
            {"code": "bad_api_key", "retryIn": False},
        ],
        "stops": [{"reason": "unauthorized", "code": "bad_api_key"}],
    }
    times = request_times(vm)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Backoff, backoff, none after a job, the idle pause after an empty poll,
    # then Retry-After; nothing after the 401.
    assert gaps == pytest.approx([0.75, 1.5, 0.0, 1.0, 7.0])
    assert server.paths == ["/job/next?wait=25"] * 6
    assert vm.run("return handle:IsRunning()") == [False]


def test_run_backoff_grows_with_jitter_up_to_the_cap(vm: LuauVM) -> None:
    with ScriptedServer([canned_error(503, "unavailable")]) as server:
        connect(vm, server.base_url, "k", "s")
        vm.run(LOOP, {"stopAfterErrors": 9, "maxBackoff": 60})
        vm.run_tasks()
    delays = [entry["retryIn"] for entry in read_log(vm)["errors"]]
    ceilings = [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert len(delays) == len(ceilings)
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    # Jitter: the three capped delays are not all the same.
    assert len(set(delays[-3:])) > 1
    times = request_times(vm)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps == pytest.approx(delays[:-1])
    assert read_log(vm)["stops"] == [{"reason": "stopped", "code": False}]


def test_stop_is_seen_within_a_second_during_a_long_backoff(vm: LuauVM) -> None:
    with ScriptedServer([canned_error(503, "unavailable")]) as server:
        connect(vm, server.base_url, "k", "s")
        vm.run(LOOP, {"minBackoff": 30})
        vm.run_tasks(until=5.0)
        assert vm.run("return handle:IsRunning()") == [True]
        vm.run("handle:Stop()")
        vm.run_tasks()
    assert vm.now <= 6.0
    assert len(vm.requests) == 1
    assert read_log(vm)["stops"] == [{"reason": "stopped", "code": False}]
    assert vm.run("return handle:IsRunning()") == [False]


def test_a_failing_on_job_is_reported_and_the_loop_goes_on(vm: LuauVM) -> None:
    second = {**JOB, "id": 8, "job_id": "def-456"}
    script = [
        canned_json(200, {"job": JOB}),
        canned_json(200, {"job": second}),
        canned_error(401, "stale_timestamp"),
    ]
    with ScriptedServer(script) as server:
        connect(vm, server.base_url, "k", "s")
        vm.run(LOOP, {"failOn": "abc-123"})
        vm.run_tasks()
    log = read_log(vm)
    assert log["jobs"] == ["abc-123", "def-456"]
    assert [entry["code"] for entry in log["errors"]] == [
        "callback_error",
        "stale_timestamp",
    ]
    assert log["stops"] == [{"reason": "unauthorized", "code": "stale_timestamp"}]


def test_run_warns_by_default(vm: LuauVM) -> None:
    with ScriptedServer([canned_error(401, "bad_api_key")]) as server:
        connect(vm, server.base_url, "k", "s")
        vm.run("gw:Run(function() end)")
        vm.run_tasks()
    assert vm.warnings == ["JobGateway bad_api_key (HTTP 401): Scripted bad_api_key."]


# --- Against the gateway ------------------------------------------------------------


@pytest.fixture
def gateway_vm(vm: LuauVM, live_gateway: Any) -> Iterator[LuauVM]:
    """The VM with ``gw`` connected to the live gateway, its queue drained."""
    connect(vm, live_gateway.base_url, live_gateway.api_key, live_gateway.hmac_secret)
    drain(vm)
    yield vm
    drain(vm)  # leave no job of ours for other tests
    vm.requests.clear()


def drain(vm: LuauVM) -> None:
    vm.run(
        """
        for _ = 1, 1000 do
            local ok, job = gw:NextJob(0)
            assert(ok, tostring(job))
            if job == nil then
                return
            end
        end
        error("the queue does not empty")
        """
    )


def publish_from_python(gateway: Any, job: dict[str, Any]) -> httpx.Response:
    headers = signed_headers(gateway.api_key, gateway.hmac_secret)
    return httpx.post(f"{gateway.base_url}/job", json=job, headers=headers, timeout=10)


@pytest.mark.backends
def test_publish_then_next_job(gateway_vm: LuauVM, live_gateway: Any) -> None:
    job_id = unique_job_id()
    ok, answer, next_ok, job = gateway_vm.run(
        """
        local ok, answer = gw:Publish(...)
        local nextOk, job = gw:NextJob(0)
        return ok, answer, nextOk, job
        """,
        {
            "job_id": job_id,
            "place_id": 109983668079237,
            "title": "Brainrot Notify",
            "fields": {"Players": "3/8"},
            "ttl": 120,
        },
    )
    assert ok is True
    assert answer["queued"] is True
    published = answer["job"]
    assert published["job_id"] == job_id
    assert published["place_id"] == 109983668079237
    assert published["fields"] == {"Players": "3/8"}
    assert published["source"] == "api" and published["channel"] == "api"
    assert isinstance(published["id"], int)
    assert next_ok is True and job == published

    publish, take = gateway_vm.requests[-2:]
    assert publish.method == "POST" and publish.url == f"{live_gateway.base_url}/job"
    assert publish.headers["Content-Type"] == "application/json"
    # Whole numbers as digits, whatever the engine's number formatting.
    body = json.loads(publish.body or "")
    assert body["place_id"] == 109983668079237 and body["ttl"] == 120
    assert isinstance(body["place_id"], int) and isinstance(body["ttl"], int)
    assert take.method == "GET" and take.body is None
    for call in (publish, take):
        # Signature v2 by default: method, target and body bound, with a nonce.
        verified = verify_request(
            call.headers,
            method=call.method,
            target=call.url.removeprefix(live_gateway.base_url),
            body=(call.body or "").encode(),
            api_keys=[live_gateway.api_key],
            secrets=[live_gateway.hmac_secret],
            require_v2=True,
        )
        assert verified.version == 2
        assert re.fullmatch(r"[0-9a-f]{64}", call.headers["X-SIGNATURE"])
        assert re.fullmatch(r"[0-9a-f]{32}", call.headers["X-NONCE"])
    assert publish.headers["X-NONCE"] != take.headers["X-NONCE"]


@pytest.mark.backends
def test_publish_reports_duplicates_and_bad_fields(gateway_vm: LuauVM) -> None:
    job = {"job_id": unique_job_id(), "message_id": uuid.uuid4().hex, "fields": {}}
    first, second, bad = gateway_vm.run(
        """
        local job = ...
        local _, first = gw:Publish(job)
        local _, second = gw:Publish(job)
        local _, bad = gw:Publish({job_id = "not a valid id!"})
        return first, second, bad
        """,
        job,
    )
    # An empty `fields` table must not reach the gateway as [].
    assert first["queued"] is True and first["job"]["fields"] == {}
    assert second["queued"] is False and second["duplicate"] is True
    assert second["job"]["id"] == first["job"]["id"]
    assert bad["code"] == "bad_field" and bad["status"] == 400


@pytest.mark.backends
def test_health(gateway_vm: LuauVM) -> None:
    ok, report = gateway_vm.run("return gw:Health()")
    assert ok is True and report["ok"] is True


@pytest.mark.backends
def test_next_job_waits_for_a_job_published_meanwhile(
    gateway_vm: LuauVM, live_gateway: Any
) -> None:
    job_id = unique_job_id()
    answers: list[httpx.Response] = []
    publisher = threading.Thread(
        target=lambda: answers.append(
            publish_from_python(live_gateway, {"job_id": job_id})
        )
    )

    def publish_once_polling(call: HttpCall) -> None:
        if "/job/next" in call.url and not publisher.is_alive() and not answers:
            publisher.start()

    gateway_vm.on_request = publish_once_polling
    started = time.monotonic()
    ok, job = gateway_vm.run("return gw:NextJob(5)")
    elapsed = time.monotonic() - started
    publisher.join()
    assert answers[0].status_code == 201
    assert ok is True and job["job_id"] == job_id
    assert elapsed < 4.5  # the job ended the wait, not the timeout


@pytest.mark.backends
def test_next_job_on_an_empty_queue_waits_then_returns_nothing(
    gateway_vm: LuauVM,
) -> None:
    started = time.monotonic()
    ok, empty = gateway_vm.run("local ok, job = gw:NextJob(1); return ok, job == nil")
    assert time.monotonic() - started >= 0.9
    assert ok is True and empty is True


@pytest.mark.backends
def test_refused_signatures_return_the_gateways_code(
    vm: LuauVM, live_gateway: Any
) -> None:
    # One gateway process for the three refusals: each costs a start-up.
    results = vm.run(
        """
        local base, key, secret = ...
        local clients = {
            wrongKey = {baseUrl = base, apiKey = "wrong", hmacSecret = secret},
            wrongSecret = {baseUrl = base, apiKey = key, hmacSecret = "wrong"},
            staleClock = {baseUrl = base, apiKey = key, hmacSecret = secret,
                clock = function() return 1700000000 end},
        }
        local out = {}
        for name, config in clients do
            local ok, err = JobGateway.new(config):Health()
            out[name] = {ok = ok or false, code = err.code, status = err.status,
                detail = err.detail, text = tostring(err)}
        end
        return out
        """,
        live_gateway.base_url,
        live_gateway.api_key,
        live_gateway.hmac_secret,
    )[0]
    codes = {
        "wrongKey": "bad_api_key",
        "wrongSecret": "bad_signature",
        "staleClock": "stale_timestamp",
    }
    assert set(results) == set(codes)
    for name, code in codes.items():
        result = results[name]
        assert result["ok"] is False
        assert result["code"] == code and result["status"] == 401
        assert live_gateway.hmac_secret not in result["detail"]
        assert result["text"].startswith(f"JobGateway {code} (HTTP 401): ")


@pytest.mark.backends
def test_run_delivers_a_job_from_the_gateway(
    gateway_vm: LuauVM, live_gateway: Any
) -> None:
    job_id = unique_job_id()
    assert publish_from_python(live_gateway, {"job_id": job_id}).status_code == 201
    gateway_vm.requests.clear()
    gateway_vm.run(LOOP, {"wait": 2, "stopOnJob": True})
    gateway_vm.run_tasks()
    log = read_log(gateway_vm)
    assert log["jobs"] == [job_id]
    assert log["errors"] == []
    assert log["stops"] == [{"reason": "stopped", "code": False}]
    assert len(gateway_vm.requests) == 1


@pytest.mark.backends
def test_a_gateway_that_requires_v2_takes_the_module_and_refuses_replays(
    vm: LuauVM, transactional_db: None
) -> None:
    env = process_env(REQUIRE_SIGNATURE_V2="true")
    with DaphneProcess(env=env) as gateway:
        connect(vm, gateway.base_url, API_KEY, HMAC_SECRET)
        job_id = unique_job_id()
        ok, answer, next_ok, job, health_ok = vm.run(
            """
            local ok, answer = gw:Publish({job_id = ...})
            local nextOk, job = gw:NextJob(0)
            local healthOk = gw:Health()
            return ok, answer, nextOk, job, healthOk
            """,
            job_id,
        )
        assert ok is True and answer["queued"] is True
        assert next_ok is True and job["job_id"] == job_id
        assert health_ok is True
        # The gateway remembered the nonce: the same request again is refused.
        health = vm.requests[-1]
        replay = httpx.get(health.url, headers=health.headers, timeout=10)
        assert replay.status_code == 401
        assert replay.json()["error"] == "replayed_nonce"
        (old,) = vm.run(
            """
            local config = ...
            local _, err = JobGateway.new(config):Health()
            return err.code
            """,
            {
                "baseUrl": gateway.base_url,
                "apiKey": API_KEY,
                "hmacSecret": HMAC_SECRET,
                "signatureVersion": 1,
            },
        )
        assert old == "signature_v2_required"


@pytest.mark.backends
def test_lease_then_release_when_full_then_ack(
    gateway_vm: LuauVM, live_gateway: Any
) -> None:
    first = publish_from_python(live_gateway, {"job_id": unique_job_id()}).json()["job"]
    second = publish_from_python(live_gateway, {"job_id": unique_job_id()}).json()[
        "job"
    ]
    (result,) = gateway_vm.run(
        """
        local ok, job, lease = gw:LeaseJob(60, 0)
        assert(ok and job, tostring(job))
        -- The server is full: give it back, first in line.
        local released = gw:Release(job, lease)
        local lostOk, lost = gw:Ack(job, lease)
        local againOk, again, againLease = gw:LeaseJob(60)
        local acked = gw:Ack(again, againLease)
        local _, nextJob, nextLease = gw:LeaseJob(30, 1)
        gw:Ack(nextJob, nextLease)
        local emptyOk, empty = gw:LeaseJob(30)
        local bad, badErr = gw:LeaseJob(0)
        return {
            first = job.id, token = lease.token, expires = lease.expires_at,
            released = released, lostOk = lostOk == nil, lost = lost,
            again = again.id, newToken = againLease.token ~= lease.token,
            acked = acked, next = nextJob.id,
            empty = emptyOk == true and empty == nil,
            bad = bad == nil, badCode = badErr.code,
        }
        """
    )
    assert result["first"] == first["id"] and result["again"] == first["id"]
    assert len(result["token"]) >= 32 and result["expires"].endswith("Z")
    assert result["released"] is True and result["acked"] is True
    assert result["lostOk"] is True
    assert result["lost"]["code"] == "lease_lost" and result["lost"]["status"] == 409
    assert result["newToken"] is True
    assert result["next"] == second["id"]
    assert result["empty"] is True
    assert result["bad"] is True and result["badCode"] == "bad_argument"
    release = next(
        call for call in gateway_vm.requests if call.url.endswith("/release")
    )
    assert release.method == "POST"
    assert release.url == f"{live_gateway.base_url}/job/{first['id']}/release"
    assert json.loads(release.body or "") == {"lease": result["token"]}
    verified = verify_request(
        release.headers,
        method="POST",
        target=release.url.removeprefix(live_gateway.base_url),
        body=(release.body or "").encode(),
        api_keys=[live_gateway.api_key],
        secrets=[live_gateway.hmac_secret],
        require_v2=True,
    )
    assert verified.version == 2
