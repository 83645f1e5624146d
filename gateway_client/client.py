"""``GatewayClient``: the gateway's HTTP API and push stream, signed, in asyncio."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import httpx

from gateway_client.backoff import Backoff
from gateway_client.errors import (
    GatewayError,
    GatewayUnreachable,
    error_from_response,
)
from gateway_client.signing import signed_headers
from gateway_client.stream import stream_jobs

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class PublishResult:
    """The answer to ``POST /job``: a new job (201) or the stored original (200)."""

    job: dict[str, Any]
    queued: bool
    duplicate: bool
    status: int


def first_credential(value: str | Sequence[str], name: str) -> str:
    """The value to sign with: the first of a comma-separated (rotating) list."""
    items = value.split(",") if isinstance(value, str) else list(value)
    for item in items:
        if item.strip():
            return item.strip()
    raise ValueError(f"{name} is empty")


class _Signer(httpx.Auth):
    """Signs every request when it is sent, retries and redirects included."""

    def __init__(self, api_key: str, secret: str) -> None:
        self._api_key = api_key
        self._secret = secret

    def headers(self) -> dict[str, str]:
        return signed_headers(self._api_key, self._secret)

    def auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(self.headers())
        yield request


class GatewayClient:
    """An async client for one gateway; use it as ``async with``.

    One connection pool is kept open for the client's life. ``timeout`` is the
    time allowed for an answer on top of any long-poll ``wait``. A list (or a
    comma-separated string) of keys or secrets signs with the first.
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
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._signer = _Signer(
            first_credential(api_key, "api_key"),
            first_credential(hmac_secret, "hmac_secret"),
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

    async def next_job(self, wait: float = 0) -> dict[str, Any] | None:
        """Claim the oldest job, holding up to ``wait`` seconds; None if none came."""
        params = {"wait": f"{wait:g}"} if wait else None
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

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        request_timeout = self.timeout if timeout is None else timeout
        try:
            response = await self._http.request(
                method, path, params=params, json=json, timeout=request_timeout
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
        retries: int = 0,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Jobs pushed on ``/ws``, in id order, each once, across reconnects.

        ``since`` replays the jobs after that id first. Close the iterator when
        done (``contextlib.aclosing``). Raises ``AuthError`` on refused
        credentials and, after ``retries`` consecutive failures (0: never),
        the last failure.
        """
        if isinstance(channels, str):
            channels = channels.split(",")
        names = [c.strip() for c in channels or () if c.strip()]
        if since is not None and since < 0:
            raise ValueError("since must be a job id (0 or more)")
        return stream_jobs(
            self.ws_url,
            headers=self._signer.headers,
            check_credentials=self.health,
            channels=names,
            since=since,
            backoff=Backoff(initial_backoff, max_backoff),
            retries=retries,
            open_timeout=self.timeout,
        )


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
