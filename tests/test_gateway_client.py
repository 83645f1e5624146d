"""``GatewayClient`` over HTTP, against ``httpx.MockTransport``: signing, answers
and every error mapping of contract section 5."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import time_machine

from gateway_client import (
    AuthError,
    BadFilter,
    BadRequest,
    CredentialError,
    GatewayClient,
    GatewayError,
    GatewayUnreachable,
    JobFilter,
    LeasedJob,
    LeaseLost,
    RateLimited,
    Unavailable,
    signing,
)
from gateway_client.errors import parse_retry_after
from testkit.servers import REPO_ROOT

JOB = {"id": 7, "job_id": "abc-1", "channel": "api"}

Handler = Callable[[httpx.Request], httpx.Response]


def client_for(handler: Handler, **kwargs: Any) -> GatewayClient:
    options: dict[str, Any] = {"api_key": "key-one", "hmac_secret": "secret-one"}
    options.update(kwargs)
    return GatewayClient(
        "http://127.0.0.1:9", transport=httpx.MockTransport(handler), **options
    )


def error(status: int, code: str, headers: dict[str, str] | None = None) -> Handler:
    body = {"error": code, "detail": f"{code} happened."}
    return lambda request: httpx.Response(status, json=body, headers=headers)


# --- Signing -------------------------------------------------------------------


async def test_every_request_is_signed_when_sent() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    async with client_for(handler) as client:
        with time_machine.travel(1_700_000_000, tick=False):
            await client.next_job()
        with time_machine.travel(1_700_000_100, tick=False):
            await client.next_job()
    stamps = [request.headers["X-TIMESTAMP"] for request in seen]
    assert stamps == ["1700000000", "1700000100"]
    for request in seen:
        assert request.headers["X-API-KEY"] == "key-one"
        # Signature v2 by default: this method, target and body, once.
        verified = signing.verify_request(
            request.headers,
            method=request.method,
            target=request.url.raw_path.decode(),
            body=request.content,
            api_keys=["key-one"],
            secrets=["secret-one"],
            require_v2=True,
            now=int(request.headers["X-TIMESTAMP"]),
        )
        assert verified.version == 2
    assert len({request.headers["X-NONCE"] for request in seen}) == 2


@pytest.mark.parametrize(
    ("api_key", "hmac_secret"),
    [("key-one, key-two", "secret-one,secret-two"), (["key-one"], ["secret-one"])],
)
async def test_the_first_of_a_list_signs(
    api_key: str | list[str], hmac_secret: str | list[str]
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    async with client_for(handler, api_key=api_key, hmac_secret=hmac_secret) as c:
        await c.health()
    headers = seen[0].headers
    assert headers["X-API-KEY"] == "key-one"
    assert headers["X-SIGNATURE"] == signing.sign_v2(
        "secret-one", headers["X-TIMESTAMP"], headers["X-NONCE"], "GET", "/health"
    )


def test_the_contract_test_vector() -> None:
    headers = signing.signed_headers("k", "another-secret", now=1_700_000_000)
    assert headers["X-SIGNATURE"] == (
        "f8afe52f00412804c44da62e42276be610568f7865d5f630f4b46c9923f3e15d"
    )


# --- Filters -------------------------------------------------------------------

# Every character the encoding must get right: operators, "~", a space, a
# comma inside a number, "%", a non-ASCII letter, and "+" in a tier's name.
WHERE = [
    "money_per_sec>=10M",
    "players<players_max",
    "name~la grande",
    "players>=1,250",
    "title!=50%",
    "name=été",
]


async def test_a_filter_goes_in_the_query_and_the_signature_covers_it() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"job": JOB})

    async with client_for(handler) as client:
        job = await client.next_job(
            wait=5, where=WHERE, channels=["111", " 222 ", ""], tier="10m+"
        )
    assert job == JOB
    request = seen[0]
    target = request.url.raw_path.decode("ascii")
    path, _, query = target.partition("?")
    assert path == "/job/next"
    # Percent-encoded: nothing a server could read two ways.
    assert ">" not in query and " " not in query and "10m%2B" in query
    # What a server decodes is exactly what was asked for, in order.
    assert parse_qs(query, strict_parsing=True) == {
        "where": WHERE,
        "channels": ["111,222"],
        "tier": ["10m+"],
        "wait": ["5"],
    }
    # Signed over the target as sent, byte for byte.
    signing.verify_request(
        request.headers,
        method="GET",
        target=target,
        api_keys=["key-one"],
        secrets=["secret-one"],
        require_v2=True,
    )


async def test_no_filter_sends_no_filter_parameters() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    async with client_for(handler) as client:
        await client.next_job()
        await client.next_job(where=[], channels="", tier=None)
    assert [r.url.raw_path for r in seen] == [b"/job/next", b"/job/next"]


async def test_a_bad_filter_answer_names_the_gateways_detail() -> None:
    detail = "where='money_per_sec>=10%': >= compares numbers, and '10%' is not one."
    answer = httpx.Response(400, json={"error": "bad_filter", "detail": detail})
    async with client_for(lambda request: answer) as client:
        with pytest.raises(BadFilter) as caught:
            await client.next_job(where="money_per_sec>=10%")
    assert isinstance(caught.value, BadRequest) and not caught.value.retryable
    assert (caught.value.code, caught.value.status) == ("bad_filter", 400)
    assert caught.value.detail == detail
    assert detail in str(caught.value)


@pytest.mark.parametrize(
    ("where", "tier", "named"),
    [
        ("money per sec>=10M", None, "money per sec>=10M"),  # not snake_case
        ("Money>=10M", None, "Money>=10M"),  # not lowercase
        ("money_per_sec", None, "money_per_sec"),  # no operator
        ("name~  ", None, "name~  "),  # no value
        ("=5", None, "=5"),  # no key
        (["a=1"] * 21, None, "at most 20"),
        (None, " ", "tier"),
    ],
)
async def test_a_malformed_filter_fails_before_any_request(
    where: Any, tier: str | None, named: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request should be made")

    async with client_for(handler) as client:
        with pytest.raises(ValueError, match=re.escape(named)):
            await client.next_job(where=where, tier=tier)
        with pytest.raises(ValueError, match=re.escape(named)):
            client.stream(where=where, tier=tier)


def test_a_single_clause_is_one_clause_even_with_commas() -> None:
    job_filter = JobFilter.of("players>=1,250", "A, B,,", " gold ")
    assert job_filter == JobFilter(("players>=1,250",), ("A", "B"), "gold")
    assert str(job_filter) == "where=players>=1,250&channels=A,B&tier=gold"
    assert not JobFilter.of() and str(JobFilter.of()) == "all"


def test_the_client_repr_holds_no_secret() -> None:
    client = GatewayClient(
        "http://127.0.0.1:8000", api_key="key-visible", hmac_secret="secret-visible"
    )
    for text in (repr(client), str(client), repr(client._signer)):
        assert "key-visible" not in text and "secret-visible" not in text
    assert "http://127.0.0.1:8000" in repr(client)


# --- Answers -------------------------------------------------------------------


async def test_next_job_returns_the_job_and_none_when_empty() -> None:
    answers = iter(
        [
            httpx.Response(200, json={"job": JOB}),
            httpx.Response(204),
            httpx.Response(200, json={"job": None}),  # the seed service's "empty"
        ]
    )
    async with client_for(lambda request: next(answers)) as client:
        assert await client.next_job() == JOB
        assert await client.next_job() is None
        assert await client.next_job() is None


async def test_the_long_poll_timeout_exceeds_its_wait() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    async with client_for(handler, timeout=5) as client:
        await client.next_job(wait=25)
        await client.next_job()
    long_poll, plain = seen
    assert long_poll.url.path == "/job/next"
    assert long_poll.url.params["wait"] == "25"
    assert long_poll.extensions["timeout"]["read"] == 30
    assert "wait" not in plain.url.params
    assert plain.extensions["timeout"]["read"] == 5


async def test_publish_new_and_duplicate() -> None:
    bodies: list[Any] = []
    answers = iter(
        [
            httpx.Response(201, json={"queued": True, "job": JOB}),
            httpx.Response(200, json={"queued": False, "duplicate": True, "job": JOB}),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and request.url.path == "/job"
        assert request.headers["Content-Type"] == "application/json"
        bodies.append(json.loads(request.content))
        return next(answers)

    async with client_for(handler) as client:
        first = await client.publish({"job_id": "abc-1", "fields": {"a": "b"}})
        again = await client.publish({"job_id": "abc-1"})
    assert bodies[0] == {"job_id": "abc-1", "fields": {"a": "b"}}
    assert (first.queued, first.duplicate, first.status, first.job) == (
        True,
        False,
        201,
        JOB,
    )
    assert (again.queued, again.duplicate, again.status, again.job) == (
        False,
        True,
        200,
        JOB,
    )


async def test_health_returns_the_report() -> None:
    report = {"ok": True, "queue": {"backend": "database", "depth": 3}}
    async with client_for(lambda r: httpx.Response(200, json=report)) as client:
        assert await client.health() == report


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>proxy</html>"),
        httpx.Response(200, json={"nothing": "here"}),
        httpx.Response(200, json=[1, 2]),
    ],
)
async def test_an_answer_outside_the_contract_is_an_error(
    response: httpx.Response,
) -> None:
    async with client_for(lambda request: response) as client:
        with pytest.raises(GatewayError) as caught:
            await client.next_job()
    assert caught.value.code == "bad_response"
    assert not caught.value.retryable


# --- Errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "headers", "kind", "retry_after"),
    [
        (401, "bad_signature", {}, AuthError, None),
        (401, "stale_timestamp", {}, AuthError, None),
        (429, "rate_limited", {"Retry-After": "7"}, RateLimited, 7.0),
        (400, "bad_field", {}, BadRequest, None),
        (404, "not_found", {}, BadRequest, None),
        (413, "too_large", {}, BadRequest, None),
        (415, "unsupported_media_type", {}, BadRequest, None),
        (503, "unavailable", {"Retry-After": "1"}, Unavailable, 1.0),
        (500, "internal_error", {}, Unavailable, None),
    ],
)
async def test_error_answers_become_typed_errors(
    status: int,
    code: str,
    headers: dict[str, str],
    kind: type[GatewayError],
    retry_after: float | None,
) -> None:
    async with client_for(error(status, code, headers)) as client:
        with pytest.raises(kind) as caught:
            await client.publish({"job_id": "x"})
    exc = caught.value
    assert (exc.code, exc.status, exc.retry_after) == (code, status, retry_after)
    assert exc.detail == f"{code} happened."
    assert exc.retryable is (kind in (RateLimited, Unavailable))
    assert code in str(exc) and str(status) in str(exc)


async def test_an_error_page_from_a_proxy_keeps_its_status() -> None:
    page = httpx.Response(502, text="<html>Bad Gateway</html>")
    async with client_for(lambda request: page) as client:
        with pytest.raises(Unavailable) as caught:
            await client.health()
    assert (caught.value.code, caught.value.status) == ("http_502", 502)


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (httpx.ConnectError("connection refused"), "unreachable"),
        (httpx.RemoteProtocolError("server disconnected"), "unreachable"),
        (httpx.ReadTimeout("timed out"), "timeout"),
    ],
)
async def test_network_failures_are_unreachable(
    failure: httpx.TransportError, code: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise failure

    async with client_for(handler) as client:
        with pytest.raises(GatewayUnreachable) as caught:
            await client.next_job(wait=1)
    assert (caught.value.code, caught.value.status) == (code, None)
    assert caught.value.retryable


def test_retry_after_as_an_http_date() -> None:
    later = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
    now = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    assert parse_retry_after(format_datetime(later, usegmt=True), now=now) == 30
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") == 0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"base_url": "ftp://127.0.0.1"}, "base_url"),
        ({"base_url": "127.0.0.1:8000"}, "base_url"),
        ({"api_key": " , "}, "api_key"),
        ({"hmac_secret": ""}, "hmac_secret"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_bad_arguments_fail_at_once(kwargs: dict[str, Any], named: str) -> None:
    options: dict[str, Any] = {
        "base_url": "http://127.0.0.1:8000",
        "api_key": "k",
        "hmac_secret": "s",
        **kwargs,
    }
    with pytest.raises(ValueError, match=named):
        GatewayClient(options.pop("base_url"), **options)


@pytest.mark.parametrize("argument", ["api_key", "hmac_secret"])
@pytest.mark.parametrize(
    ("value", "position"),
    [("\u2026", 1), ("key-\u00e9t\u00e9", 5), ("new\nline", 4), (["o\tk", "k"], 2)],
)
async def test_a_credential_that_is_not_printable_ascii_is_refused_before_any_request(
    argument: str, value: Any, position: int
) -> None:
    """The docs' old placeholder ("…") died in httpx with a UnicodeEncodeError."""
    credentials: dict[str, Any] = {"api_key": "k", "hmac_secret": "s", argument: value}
    with pytest.raises(CredentialError) as caught:
        GatewayClient("http://127.0.0.1:8000", **credentials)
    message = str(caught.value)
    assert message.startswith(f"{argument} must be printable ASCII")
    assert f"character {position} is not" in message
    assert "\u00e9" not in message and "key-" not in message and "line" not in message
    assert isinstance(caught.value, ValueError)  # as every other bad argument


def test_only_the_signing_credential_must_be_ascii() -> None:
    # Of a rotating list the first signs; the others are the gateway's business.
    client = GatewayClient(
        "http://127.0.0.1:8000", api_key="new, \u2026", hmac_secret=["s", "\u00e9"]
    )
    assert client._signer.headers("GET", "/health")["X-API-KEY"] == "new"


def test_ws_url_follows_the_base_url() -> None:
    plain = GatewayClient("http://127.0.0.1:8000/", api_key="k", hmac_secret="s")
    behind_proxy = GatewayClient(
        "https://127.0.0.1/gateway", api_key="k", hmac_secret="s"
    )
    assert plain.ws_url == "ws://127.0.0.1:8000/ws"
    assert behind_proxy.ws_url == "wss://127.0.0.1/gateway/ws"


def test_the_package_does_not_import_django() -> None:
    code = (
        "import sys, gateway_client, gateway_client.worker, gateway_client.__main__\n"
        "from gateway_client import GatewayClient, JobFilter, BadFilter\n"
        "assert 'django' not in sys.modules, sorted(m for m in sys.modules"
        " if m.startswith('django'))\n"
        "assert 'jobs' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- Leases ----------------------------------------------------------------------


async def test_a_lease_is_asked_for_acked_and_released_as_the_api_says() -> None:
    seen: list[httpx.Request] = []
    lease = {"token": "t" * 32, "expires_at": "2026-12-06T17:00:00.000Z"}

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/job/next":
            return httpx.Response(200, json={"job": JOB, "lease": lease})
        return httpx.Response(200, json={"acked": True, "id": 7})

    async with client_for(answer) as client:
        leased = await client.lease_job(60, wait=5, channels="api")
        assert leased is not None
        assert (leased.id, leased.job, leased.token) == (7, JOB, lease["token"])
        assert leased.expires_at == lease["expires_at"]
        await client.ack(leased)
        await client.release(leased)
    take, ack, release = seen
    assert parse_qs(take.url.query.decode()) == {
        "channels": ["api"],
        "lease": ["60"],
        "wait": ["5"],
    }
    assert (ack.method, ack.url.path) == ("POST", "/job/7/ack")
    assert (release.method, release.url.path) == ("POST", "/job/7/release")
    for call in (ack, release):
        assert json.loads(call.content) == {"lease": lease["token"]}
        assert call.headers["content-type"] == "application/json"
        assert call.headers["x-signature-version"] == "2"


async def test_lease_lost_and_an_empty_queue() -> None:
    answers = iter([httpx.Response(204)])
    async with client_for(lambda request: next(answers)) as client:
        assert await client.lease_job(30) is None
    async with client_for(error(409, "lease_lost")) as client:
        with pytest.raises(LeaseLost) as lost:
            await client.ack(LeasedJob(JOB, "t" * 32, "2026-12-06T17:00:00.000Z"))
        assert isinstance(lost.value, BadRequest) and not lost.value.retryable
        assert lost.value.status == 409


@pytest.mark.parametrize("seconds", [0, 301, 1.5])
async def test_a_lease_out_of_range_fails_before_any_request(seconds: Any) -> None:
    async with client_for(lambda request: pytest.fail("sent")) as client:
        with pytest.raises(ValueError, match="1 to 300"):
            await client.lease_job(seconds)
