"""The HTTP API and the admin's pages through a real daphne process."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from urllib.parse import urljoin

import httpx
import pytest

from gateway_client import signing
from tests.conftest import assert_error, process_env
from tests.servers import DaphneProcess
from tests.stack import STACK

Sign = Callable[..., dict[str, str]]

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def gateway(django_db_setup: None) -> Iterator[DaphneProcess]:
    """One daphne for the module: what ``live_gateway`` starts, started once."""
    with DaphneProcess(env=process_env()) as process:
        yield process


@pytest.fixture
def client(
    gateway: DaphneProcess, transactional_db: None, request: pytest.FixtureRequest
) -> Iterator[httpx.Client]:
    """A client of the module's daphne; each test starts on an empty store."""
    if STACK == "services":
        request.getfixturevalue("clean_redis")
    with httpx.Client(base_url=gateway.base_url, timeout=10) as http:
        yield http


def test_publish_claim_and_empty(client: httpx.Client, sign: Sign) -> None:
    posted = client.post(
        "/job",
        json={"job_id": "live-1", "place_id": 42, "fields": {"Players": "3/8"}},
        headers=sign(),
    )
    assert posted.status_code == 201, posted.text
    assert posted.json()["queued"] is True
    duplicate = client.post("/job", json={"job_id": "live-1"}, headers=sign())
    assert duplicate.status_code == 200
    assert duplicate.json()["duplicate"] is True

    claimed = client.get("/job/next", headers=sign())
    assert claimed.status_code == 200
    assert claimed.json() == {"job": posted.json()["job"]}
    empty = client.get("/job/next", headers=sign())
    assert empty.status_code == 204
    assert empty.content == b""

    health = client.get("/health", headers=sign())
    assert health.status_code == 200
    assert health.json()["ok"] is True
    assert client.get("/healthz").json() == {"ok": True}


def test_each_signing_failure(client: httpx.Client, sign: Sign) -> None:
    good = sign()
    stale = sign(now=time.time() - 3600)
    # Bytes, because a header value on the wire need not be ASCII.
    cases: list[tuple[dict[str, str] | dict[bytes, bytes], str]] = [
        ({}, "missing_api_key"),
        ({"X-API-KEY": "wrong"}, "bad_api_key"),
        ({b"X-API-KEY": "clé🔑".encode()}, "bad_api_key"),
        ({"X-API-KEY": good["X-API-KEY"]}, "missing_signature"),
        ({**good, "X-TIMESTAMP": "12.5"}, "bad_timestamp"),
        (dict(stale), "stale_timestamp"),
        ({**good, "X-SIGNATURE": "0" * 64}, "bad_signature"),
    ]
    for headers, code in cases:
        response = client.get("/job/next", headers=headers)
        assert_error(response, 401, code)
        assert (
            signing.sign("test-hmac-secret", good["X-TIMESTAMP"]) not in response.text
        )
    upper = {**good, "X-SIGNATURE": good["X-SIGNATURE"].upper()}
    assert client.get("/job/next", headers=upper).status_code == 204


def test_error_shapes(client: httpx.Client, sign: Sign) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.delete("/job/next"), 401, "missing_api_key")
    wrong_method = client.delete("/job/next", headers=sign())
    assert_error(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "GET"

    def post(body: bytes, content_type: str) -> httpx.Response:
        headers = {**sign(), "Content-Type": content_type}
        return client.post("/job", content=body, headers=headers)

    assert_error(post(b"{}", "text/plain"), 415, "unsupported_media_type")
    # A form body the server cannot parse is one more unsupported body: the
    # server leaves form bodies to the application (jobs.serving).
    multipart = post(b"not a multipart body", "multipart/form-data; boundary=x")
    assert_error(multipart, 415, "unsupported_media_type")
    assert_error(post(b"{oops", "application/json"), 400, "bad_json")
    too_big = b'{"job_id": "x", "title": "' + b"x" * 20000 + b'"}'
    assert_error(post(too_big, "application/json"), 413, "too_large")
    assert_error(
        client.get("/healthz", headers={"Host": "evil.example"}), 400, "bad_host"
    )
    assert client.get("/job/next", headers=sign()).status_code == 204  # nothing stored


def test_admin_login_page_and_its_styles(client: httpx.Client) -> None:
    assert client.get("/admin/").status_code == 302
    login = client.get("/admin/login/")
    assert login.status_code == 200
    assert login.headers["content-type"].startswith("text/html")
    stylesheets = re.findall(r'<link rel="stylesheet"[^>]*href="([^"]+)"', login.text)
    # Hashed names (base.<hash>.css) once collectstatic has run.
    base = re.compile(r"/static/admin/css/base(\.[0-9a-f]+)?\.css$")
    assert any(base.search(href) for href in stylesheets), stylesheets
    for href in stylesheets:
        css = client.get(urljoin(str(login.url), href))
        assert css.status_code == 200, href
        assert css.headers["content-type"].startswith("text/css"), href
        assert css.content
