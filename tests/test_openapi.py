"""The OpenAPI document: served, complete, and true to the running gateway.

The fuzzing half loads the document from a real daphne process
(``GET /openapi.json``) and lets schemathesis send every operation generated
requests, valid and invalid, each signed by an auth hook with the test keys
(v1; a second run signs each request again with v2 as it goes on the wire).
Every answer must be documented (status, content type, headers, body schema),
none may be a 500, and no request the hook signed may be refused with a 401.
``OPENAPI_EXAMPLES`` sets the examples per operation and generation mode
(default 25; a nightly run can raise it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from django.urls import URLPattern, URLResolver, get_resolver
from hypothesis import HealthCheck, settings
from schemathesis.generation.case import Case as GenericCase
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gateway_client.signing import (
    API_KEY_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    VERSION_HEADER,
    new_nonce,
    sign_v2,
    signed_headers,
)
from jobs import filters, leases, payloads, views
from jobs.schema import DOCUMENT
from tests.conftest import LiveGateway
from tests.stack import API_KEY, HMAC_SECRET

EXAMPLES = int(os.environ.get("OPENAPI_EXAMPLES", "25"))
# A long poll on an empty queue lasts its whole wait: the hook keeps each
# generated wait this short so the run stays fast (parsing is what is tested).
MAX_FUZZ_WAIT = 0.2
V1_HEADERS = (API_KEY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
CASE_ID_HEADER = "X-Schemathesis-TestCaseId"

Case = GenericCase[Any]
SPEC: dict[str, Any] = json.loads(DOCUMENT.read_text("utf-8"))
SCHEMAS = SPEC["components"]["schemas"]


# --- The document itself ----------------------------------------------------------


def _api_routes() -> set[str]:
    """Every path the URLconf serves, less the admin and the 404 catch-alls."""
    routes = set()
    for entry in get_resolver().url_patterns:
        if isinstance(entry, URLResolver):
            continue  # the admin
        assert isinstance(entry, URLPattern)
        route = str(entry.pattern)
        if route.startswith("admin/") or route in ("", "<path:unknown>"):
            continue
        # Django's <int:pk> is OpenAPI's {id}, as the contract names it.
        routes.add("/" + route.replace("<int:pk>", "{id}"))
    return routes


def test_it_is_openapi_3_1_and_loads() -> None:
    assert SPEC["openapi"].startswith("3.1.")
    # schemathesis validates the document (OpenAPI 3.1) and resolves every
    # $ref of every operation.
    loaded = schemathesis.openapi.from_dict(SPEC)
    for path, methods in SPEC["paths"].items():
        for method in methods:
            operation = loaded[path][method.upper()]
            assert operation.path == path


def test_every_route_of_the_api_is_documented() -> None:
    assert _api_routes() == set(SPEC["paths"])


def test_limits_agree_with_the_code() -> None:
    job_input = SCHEMAS["JobInput"]["properties"]
    assert job_input["job_id"]["pattern"] == f"^{payloads.JOB_ID_RE.pattern}$"
    assert job_input["channel"]["pattern"] == f"^{payloads.CHANNEL_RE.pattern}$"
    assert job_input["ttl"]["maximum"] == payloads.MAX_TTL_SECONDS
    assert job_input["fields"]["maxProperties"] == payloads.MAX_FIELDS
    assert set(job_input) == payloads.ALLOWED_KEYS
    parameters = {p["name"]: p for p in SPEC["paths"]["/job/next"]["get"]["parameters"]}
    assert parameters["wait"]["schema"]["maximum"] == views.MAX_WAIT_SECONDS
    assert parameters["where"]["schema"]["maxItems"] == filters.MAX_CLAUSES
    lease = parameters["lease"]["schema"]
    assert (lease["minimum"], lease["maximum"]) == (
        leases.MIN_LEASE_SECONDS,
        leases.MAX_LEASE_SECONDS,
    )
    token = SCHEMAS["LeaseToken"]["properties"]["lease"]
    assert token["maxLength"] == leases.MAX_TOKEN_LENGTH


def test_every_error_answer_has_the_contract_shape() -> None:
    error = SCHEMAS["Error"]
    assert error["required"] == ["error", "detail"]
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) < 400:
                    continue
                name = response["$ref"].rsplit("/", 1)[-1]
                content = SPEC["components"]["responses"][name]["content"]
                ref = content["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/Error", (method, path, status)


def test_signed_operations_declare_the_v1_and_v2_headers() -> None:
    schemes = SPEC["components"]["securitySchemes"]
    names = {scheme.get("name") for scheme in schemes.values()}
    assert {
        "X-API-KEY",
        "X-TIMESTAMP",
        "X-SIGNATURE",
        "X-SIGNATURE-VERSION",
        "X-NONCE",
    } <= names
    public = {"/healthz", "/openapi.json"}
    for path, item in SPEC["paths"].items():
        for operation in item.values():
            security = operation.get("security", SPEC["security"])
            assert (security == []) == (path in public), path


@pytest.mark.backends
def test_it_is_served_unsigned_and_read_only(live_gateway: LiveGateway) -> None:
    with httpx.Client(base_url=live_gateway.base_url) as client:
        served = client.get("/openapi.json")
        refused = client.post("/openapi.json")
    assert served.status_code == 200
    assert served.headers["content-type"] == "application/json"
    assert served.json() == SPEC
    assert refused.status_code == 405
    assert refused.json()["error"] == "method_not_allowed"
    assert refused.headers["Allow"] == "GET, HEAD"


@pytest.mark.backends
async def test_integral_floats_are_integers_as_json_schema_says(
    api: httpx.AsyncClient, sign: Any
) -> None:
    # schemathesis found it: JSON Schema's integer 383.0 was a 400.
    body = {"job_id": "float-ttl", "ttl": 383.0, "place_id": 5.0}
    response = await api.post("/job", json=body, headers=sign())
    assert response.status_code == 201, response.text
    assert response.json()["job"]["place_id"] == 5
    refused = await api.post(
        "/job", json={"job_id": "half", "ttl": 1.5}, headers=sign()
    )
    assert refused.status_code == 400


# --- schemathesis against a real daphne ------------------------------------------


class SignedRequests:
    """The auth hook: signs each generated request with the test keys, now (v1)."""

    def get(self, case: Case, ctx: schemathesis.AuthContext) -> str:
        return API_KEY

    # The cases signed: schemathesis fills some cases' credentials itself
    # (empty, or random), and those are refused as they should be.
    signed: set[str] = set()

    def set(self, case: Case, data: str, ctx: schemathesis.AuthContext) -> None:
        case.headers.update(signed_headers(data, HMAC_SECRET))
        self.signed.add(case.id)


def _signed_by_the_hook(headers: Mapping[str, str | bytes]) -> bool:
    """Whether a request is its case's, signed by the hook (not a check's probe)."""
    return headers.get(CASE_ID_HEADER) in SignedRequests.signed and all(
        headers.get(name) for name in V1_HEADERS
    )


class SignedNow(requests.auth.AuthBase):
    """Signs a request the hook signed again, now, as it goes on the wire (v1).

    The hook signs a case when schemathesis prepares it; on a busy machine the
    request may leave later than the gateway's timestamp tolerance allows.
    """

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        headers = request.headers
        if _signed_by_the_hook(headers):
            key = headers[API_KEY_HEADER]
            assert isinstance(key, str)
            headers.update(signed_headers(key, HMAC_SECRET))
        return request


class SignedV2(requests.auth.AuthBase):
    """Signs a request the hook signed again, with v2, as it goes on the wire.

    v2 covers the method, the path and query and the body's hash, which only
    the prepared request holds exactly as sent. The key stays as the request
    has it, the timestamp is now; a check's probe without one of them (is a missing
    header refused?) goes as it is.
    """

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        headers = request.headers
        if not _signed_by_the_hook(headers):
            return request  # an operation without security, or a probe
        assert request.method is not None
        body = request.body or b""
        assert isinstance(body, bytes | str)  # schemathesis sends no streams
        # Now, as SignedNow does: the hook's timestamp may be stale by now.
        timestamp = str(int(time.time()))
        headers[TIMESTAMP_HEADER] = timestamp
        nonce = new_nonce()
        headers[NONCE_HEADER] = nonce
        headers[VERSION_HEADER] = "2"
        headers[SIGNATURE_HEADER] = sign_v2(
            HMAC_SECRET,
            timestamp,
            nonce,
            request.method,
            request.path_url,
            body.encode() if isinstance(body, str) else body,
        )
        return request


@pytest.fixture
def live_schema(live_gateway: LiveGateway) -> schemathesis.BaseSchema:
    """The document as the live gateway serves it, pointed at that gateway."""
    loaded = schemathesis.openapi.from_url(f"{live_gateway.base_url}/openapi.json")
    loaded.config.update(base_url=live_gateway.base_url)
    loaded.auth(refresh_interval=None)(SignedRequests)

    @loaded.hook
    def map_query(
        context: schemathesis.HookContext, query: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        wait = (query or {}).get("wait")
        if isinstance(wait, int | float) and not isinstance(wait, bool):
            assert query is not None
            query["wait"] = min(wait, MAX_FUZZ_WAIT)
        return query

    return loaded


fuzzed = schemathesis.pytest.from_fixture("live_schema")


def _excluded(case: Case) -> list[schemathesis.CheckFunction]:
    """Checks that cannot hold for this operation, and why.

    ``GET /job/next``: a filter's meaning is beyond a schema. ``where=a>b!``
    has the documented shape but no number to compare with, and ``tier=x``
    names no tier configured here: both are (documented) 400s for data the
    schema allows. Ack and release: a well-formed id and token are still a
    404 or a 409 unless a lease is held on that job under that token.
    Shape violations must still be refused, and are.
    """
    if case.operation.path in ("/job/next", "/job/{id}/ack", "/job/{id}/release"):
        return [positive_data_acceptance]
    return []


def _keeps_to_its_document(case: Case, auth: requests.auth.AuthBase | None) -> None:
    # Status, content type, headers and body are checked against the
    # document; a 500 is undocumented, so it fails too, and says so here.
    response = case.call_and_validate(excluded_checks=_excluded(case), auth=auth)
    assert response.status_code < 500, response.text
    # The document allows a 401 on every signed operation, but a request the
    # hook signed is signed right: refused, the signing or its check is broken.
    if _signed_by_the_hook(response.request.headers):
        assert response.status_code != 401, response.text


fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.backends
@pytest.mark.processes
@fuzzed.parametrize()
@fuzz
def test_the_gateway_keeps_to_its_document(case: Case) -> None:
    _keeps_to_its_document(case, auth=SignedNow())


@pytest.mark.backends
@pytest.mark.processes
@fuzzed.parametrize()
@fuzz
def test_the_gateway_keeps_to_its_document_signed_with_v2(case: Case) -> None:
    _keeps_to_its_document(case, auth=SignedV2())
