"""``GatewayClient``: the gateway's HTTP API and push stream, signed, in asyncio."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit

import httpx

from gateway_client.backoff import Backoff
from gateway_client.errors import (
    BadRequest,
    CredentialError,
    GatewayError,
    GatewayUnreachable,
    error_from_response,
)
from gateway_client.filters import JobFilter
from gateway_client.signing import signed_headers, signed_headers_v2
from gateway_client.stream import stream_jobs

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class LeasedJob:
    """A job held under a lease: ``ack`` it when done, ``release`` it to give it back.

    ``expires_at`` is when the lease runs out (ISO 8601, UTC); the gateway then
    puts the job back in the queue by itself.
    """

    job: dict[str, Any]
    token: str
    expires_at: str

    @property
    def id(self) -> int:
        """The job's integer id, as ``ack`` and ``release`` name it."""
        pk: int = self.job["id"]
        return pk


@dataclass(frozen=True)
class PublishResult:
    """The answer to ``POST /job``: a new job (201) or the stored original (200)."""

    job: dict[str, Any]
    queued: bool
    duplicate: bool
    status: int


def first_credential(value: str | Sequence[str], name: str) -> str:
    """The value to sign with: the first of a comma-separated (rotating) list.

    Raises ``CredentialError`` when there is none, or when it is not printable
    ASCII: the key travels in an HTTP header, which cannot carry anything else,
    and the gateway's ``API_KEY`` and ``HMAC_SECRET`` are ASCII too.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    for item in items:
        if item.strip():
            return _printable_ascii(item.strip(), name)
    raise CredentialError(f"{name} is empty")


def _printable_ascii(value: str, name: str) -> str:
    for position, char in enumerate(value, 1):
        if not " " <= char <= "~":
            # The position, never the character: the value is a secret.
            raise CredentialError(
                f"{name} must be printable ASCII, as the gateway's own is, but "
                f"character {position} is not (a placeholder such as '…' left in?)"
            )
    return value


SignatureVersion = Literal[1, 2]
WsAuth = Literal["ticket", "headers"]


class _Signer(httpx.Auth):
    """Signs every request when it is sent, retries and redirects included.

    v2 (the default) signs the method, the target as httpx sends it and the
    body, with a fresh nonce each time; v1 signs the timestamp alone.
    """

    requires_request_body = True

    def __init__(self, api_key: str, secret: str, version: SignatureVersion) -> None:
        if version not in (1, 2):
            raise ValueError(f"signature_version must be 1 or 2, not {version!r}")
        self._api_key = api_key
        self._secret = secret
        self.version = version

    def __repr__(self) -> str:
        return f"<_Signer v{self.version}>"

    def headers(self, method: str, target: str, body: bytes = b"") -> dict[str, str]:
        if self.version == 1:
            return signed_headers(self._api_key, self._secret)
        return signed_headers_v2(
            self._api_key, self._secret, method=method, target=target, body=body
        )

    def auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        target = request.url.raw_path.decode("ascii")
        request.headers.update(self.headers(request.method, target, request.content))
        yield request


class GatewayClient:
    """An async client for one gateway; use it as ``async with``.

    One connection pool is kept open for the client's life. ``timeout`` is the
    time allowed for an answer on top of any long-poll ``wait``. A list (or a
    comma-separated string) of keys or secrets signs with the first.
    ``signature_version`` 2 (the default) signs each request whole and once;
    1 is the contract's original, for gateways that predate v2. ``ws_auth``
    "ticket" (the default) opens ``/ws`` with a single-use ticket, so the key
    never rides on the handshake; "headers" sends the key (and signature).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | Sequence[str],
        hmac_secret: str | Sequence[str],
        timeout: float = 30.0,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
        signature_version: SignatureVersion = 2,
        ws_auth: WsAuth = "ticket",
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        if ws_auth not in ("ticket", "headers"):
            raise ValueError(f"ws_auth must be 'ticket' or 'headers', not {ws_auth!r}")
        self.ws_auth: WsAuth = ws_auth
        self._signer = _Signer(
            first_credential(api_key, "api_key"),
            first_credential(hmac_secret, "hmac_secret"),
            signature_version,
        )
        scheme = "wss" if parts.scheme == "https" else "ws"
        path = parts.path.rstrip("/") + "/ws"
        self.ws_url = urlunsplit((scheme, parts.netloc, path, "", ""))
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            auth=self._signer,
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
            ),
            transport=transport,
            headers={"Accept": "application/json"},
        )

    def __repr__(self) -> str:
        # Never the key or the secret: a repr ends up in logs and tracebacks.
        return f"<GatewayClient {self.base_url} signature v{self._signer.version}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    # --- HTTP ---------------------------------------------------------------

    async def next_job(
        self,
        wait: float = 0,
        *,
        where: Sequence[str] | str | None = None,
        channels: Sequence[str] | str | None = None,
        tier: str | None = None,
    ) -> dict[str, Any] | None:
        """Claim the oldest job, holding up to ``wait`` seconds; None if none came.

        ``where`` clauses (``"money_per_sec>=10M"``), ``channels`` and ``tier``
        claim the oldest job that matches them all instead (docs/filters.md);
        the others stay queued. A filter the gateway cannot read raises
        ``BadFilter`` with its detail; a malformed clause, ``ValueError``.
        """
        params = JobFilter.of(where, channels, tier).params()
        if wait:
            params.append(("wait", f"{wait:g}"))
        response = await self._request(
            "GET", "/job/next", params=params, timeout=self.timeout + wait
        )
        if response.status_code == 204:
            return None
        body = _json_object(response)
        job = body.get("job")
        if response.status_code == 200 and "job" in body and job is None:
            return None  # how the seed service said "empty"; the contract says 204
        if response.status_code != 200 or not isinstance(job, dict):
            raise _unexpected(response)
        return job

    async def lease_job(
        self,
        seconds: int,
        wait: float = 0,
        *,
        where: Sequence[str] | str | None = None,
        channels: Sequence[str] | str | None = None,
        tier: str | None = None,
    ) -> LeasedJob | None:
        """Claim the oldest job under a lease of ``seconds`` (1 to 300); None if none.

        The job is this worker's until the lease runs out: ``ack`` it once it
        is done, or ``release`` it to hand it back at the head of the queue.
        Left alone, it goes back by itself when the lease ends. The filter and
        ``wait`` are ``next_job``'s.
        """
        if not 1 <= seconds <= 300 or int(seconds) != seconds:
            raise ValueError("seconds must be a whole number from 1 to 300")
        params = JobFilter.of(where, channels, tier).params()
        params.append(("lease", str(int(seconds))))
        if wait:
            params.append(("wait", f"{wait:g}"))
        response = await self._request(
            "GET", "/job/next", params=params, timeout=self.timeout + wait
        )
        if response.status_code == 204:
            return None
        body = _json_object(response)
        job, lease = body.get("job"), body.get("lease")
        if (
            response.status_code != 200
            or not isinstance(job, dict)
            or not isinstance(lease, dict)
            or not isinstance(lease.get("token"), str)
            or not isinstance(lease.get("expires_at"), str)
        ):
            raise _unexpected(response)
        return LeasedJob(job, lease["token"], lease["expires_at"])

    async def ack(self, leased: LeasedJob) -> None:
        """The leased job is done: it is never handed out again.

        Raises ``LeaseLost`` if the lease ran out (or was used) first.
        """
        await self._settle(leased, "ack")

    async def release(self, leased: LeasedJob) -> None:
        """Give the leased job back, first in line for the next worker.

        Raises ``LeaseLost`` if the lease ran out (or was used) first.
        """
        await self._settle(leased, "release")

    async def _settle(self, leased: LeasedJob, how: str) -> None:
        response = await self._request(
            "POST", f"/job/{leased.id}/{how}", json={"lease": leased.token}
        )
        if response.status_code != 200:
            raise _unexpected(response)

    async def publish(self, job: Mapping[str, Any]) -> PublishResult:
        """Publish one job; a duplicate is a success carrying the stored original."""
        response = await self._request("POST", "/job", json=dict(job))
        body = _json_object(response)
        stored = body.get("job")
        if response.status_code not in (200, 201) or not isinstance(stored, dict):
            raise _unexpected(response)
        return PublishResult(
            job=stored,
            queued=body.get("queued") is True,
            duplicate=body.get("duplicate") is True,
            status=response.status_code,
        )

    async def health(self) -> dict[str, Any]:
        """The gateway's signed ``/health`` report."""
        response = await self._request("GET", "/health")
        body = _json_object(response)
        if response.status_code != 200:
            raise _unexpected(response)
        return body

    async def ws_ticket(self) -> str:
        """A single-use ticket for one ``/ws`` handshake (``POST /ws/ticket``)."""
        response = await self._request("POST", "/ws/ticket")
        ticket = _json_object(response).get("ticket")
        if response.status_code != 200 or not isinstance(ticket, str) or not ticket:
            raise _unexpected(response)
        return ticket

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] | None = None,
        json: Any = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        request_timeout = self.timeout if timeout is None else timeout
        try:
            # A list of pairs keeps repeated where= clauses; httpx encodes
            # them once, and the signer signs the target exactly as encoded.
            response = await self._http.request(
                method,
                path,
                params=tuple(params) if params else None,
                json=json,
                timeout=request_timeout,
            )
        except httpx.TimeoutException as exc:
            raise GatewayUnreachable(
                "timeout",
                None,
                f"{method} {path}: no answer within {request_timeout:g}s",
            ) from exc
        except httpx.TransportError as exc:
            raise GatewayUnreachable(
                "unreachable",
                None,
                f"{method} {path}: {str(exc) or type(exc).__name__}",
            ) from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    # --- WebSocket ----------------------------------------------------------

    def stream(
        self,
        channels: Sequence[str] | str | None = None,
        since: int | None = None,
        *,
        where: Sequence[str] | str | None = None,
        tier: str | None = None,
        retries: int = 0,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Jobs pushed on ``/ws``, in id order, each once, across reconnects.

        ``since`` replays the jobs after that id first. ``channels``, ``where``
        and ``tier`` push (and replay) only the jobs that match them all, as
        ``next_job`` claims. Close the iterator when done
        (``contextlib.aclosing``). Raises ``AuthError`` on refused credentials,
        ``BadFilter`` when the gateway refuses a handshake carrying a filter
        although the credentials are good and, after ``retries`` consecutive
        failures (0: never), the last failure.
        """
        job_filter = JobFilter.of(where, channels, tier)
        if since is not None and since < 0:
            raise ValueError("since must be a job id (0 or more)")
        return stream_jobs(
            self.ws_url,
            authorise=self._authorise_handshake,
            check_credentials=self.health,
            job_filter=job_filter,
            since=since,
            backoff=Backoff(initial_backoff, max_backoff),
            retries=retries,
            open_timeout=self.timeout,
        )

    async def _authorise_handshake(self, url: str) -> tuple[str, dict[str, str]]:
        """The URL and headers that open ``url``: a ticket, or signed headers."""
        if self.ws_auth == "ticket":
            try:
                ticket = await self.ws_ticket()
            except BadRequest as exc:
                if exc.status != 404:
                    raise
                # A gateway from before tickets: fall back to the headers.
                logger.warning("the gateway issues no tickets; sending the key")
                self.ws_auth = "headers"
            else:
                separator = "&" if urlsplit(url).query else "?"
                return f"{url}{separator}ticket={ticket}", {}
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        return url, self._signer.headers("GET", target)


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise _unexpected(response) from None
    if not isinstance(body, dict):
        raise _unexpected(response)
    return body


def _unexpected(response: httpx.Response) -> GatewayError:
    return GatewayError(
        "bad_response",
        response.status_code,
        f"{response.request.method} {response.request.url.path}: "
        "the answer is not what the contract describes",
    )
