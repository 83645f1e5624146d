"""``POST /job`` (contract sections 2, 4, 5): publishing, de-duplication, bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import time_machine
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pytest_django import Settings

from jobs import bus
from jobs.models import Job
from jobs.payloads import PayloadError, parse_job
from tests.conftest import assert_error

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("empty_redis")]

Sign = Callable[..., dict[str, str]]

MOMENT = datetime(2026, 11, 28, 17, 0, 0, 123000, tzinfo=UTC)

count_jobs = sync_to_async(Job.objects.count)


# --- Publishing ---------------------------------------------------------------


async def test_201_carries_every_job_field(api: httpx.AsyncClient, sign: Sign) -> None:
    with time_machine.travel(MOMENT, tick=False):
        response = await api.post("/job", json={"job_id": "a-1"}, headers=sign())
    assert response.status_code == 201, response.text
    body = response.json()
    assert body == {
        "queued": True,
        "job": {
            "id": body["job"]["id"],
            "job_id": "a-1",
            "place_id": None,
            "channel": "api",
            "source": "api",
            "message_id": None,
            "title": None,
            "fields": {},
            "numbers": {},
            "created_at": "2026-11-28T17:00:00.123Z",
            "expires_at": "2026-11-28T17:05:00.123Z",
        },
    }
    assert isinstance(body["job"]["id"], int)


async def test_every_optional_field_is_stored_and_echoed(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    posted = {
        "job_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "place_id": 109983668079237,
        "channel": "1390012345678901234",
        "source": "discord",
        "message_id": "1390098765432109876",
        "title": "Brainrot Notify 🧠",
        "fields": {"Name": "La Grande Combinasion", "Money per sec": "$10M/s"},
        "ttl": 90,
    }
    response = await api.post("/job", json=posted, headers=sign())
    assert response.status_code == 201, response.text
    job = response.json()["job"]
    expected = {k: v for k, v in posted.items() if k != "ttl"}
    assert {k: job[k] for k in expected} == expected
    created = datetime.fromisoformat(job["created_at"])
    assert datetime.fromisoformat(job["expires_at"]) - created == timedelta(seconds=90)
    stored = await sync_to_async(Job.objects.get)(pk=job["id"])
    assert stored.to_wire() == job


async def test_job_ttl_seconds_is_the_default_expiry(
    api: httpx.AsyncClient, sign: Sign, settings: Settings
) -> None:
    settings.JOB_TTL_SECONDS = 42
    with time_machine.travel(MOMENT, tick=False):
        response = await api.post("/job", json={"job_id": "a"}, headers=sign())
    assert response.json()["job"]["expires_at"] == "2026-11-28T17:00:42.123Z"


async def test_ids_increase(api: httpx.AsyncClient, sign: Sign) -> None:
    ids = [
        (await api.post("/job", json={"job_id": f"j{n}"}, headers=sign())).json()[
            "job"
        ]["id"]
        for n in range(3)
    ]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3


@pytest.mark.parametrize(
    "payload",
    [
        {"job_id": "a" * 64},
        {"job_id": "A_z-09"},
        {"job_id": "a", "ttl": 1},
        {"job_id": "a", "ttl": 86400},
        {"job_id": "a", "place_id": None, "title": None, "fields": None},
        {"job_id": "a", "title": "t" * 256},
        {"job_id": "a", "fields": {"Ünïcode ✓": "värde 🎉"}},
    ],
)
async def test_edge_values_are_accepted(
    api: httpx.AsyncClient, sign: Sign, payload: dict[str, Any]
) -> None:
    response = await api.post("/job", json=payload, headers=sign())
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON"],
)
async def test_json_content_types_are_accepted(
    api: httpx.AsyncClient, sign: Sign, content_type: str
) -> None:
    response = await api.post(
        "/job",
        content=b'{"job_id": "a"}',
        headers={**sign(), "Content-Type": content_type},
    )
    assert response.status_code == 201, response.text


# --- Duplicates ---------------------------------------------------------------


@pytest.fixture
async def broadcasts() -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
    """Every job the gateway broadcasts to WebSocket clients, in order."""
    layer = get_channel_layer()
    assert layer is not None
    channel = await layer.new_channel()
    await layer.group_add(bus.ALL_JOBS, channel)
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def pump() -> None:
        while True:
            message = await layer.receive(channel)
            news = bus.news_in(message)
            for job in [] if news is None else news.published:
                await received.put(job)

    task = asyncio.create_task(pump())
    try:
        yield received
    finally:
        task.cancel()
        await layer.group_discard(bus.ALL_JOBS, channel)


async def next_broadcast(received: asyncio.Queue[dict[str, Any]]) -> dict[str, Any]:
    return await asyncio.wait_for(received.get(), timeout=10)


async def test_duplicate_message_id_answers_the_stored_original(
    api: httpx.AsyncClient,
    sign: Sign,
    broadcasts: asyncio.Queue[dict[str, Any]],
) -> None:
    first = await api.post(
        "/job", json={"job_id": "a", "message_id": "m1"}, headers=sign()
    )
    assert first.status_code == 201
    original = first.json()["job"]
    assert (await next_broadcast(broadcasts))["id"] == original["id"]

    again = await api.post(
        "/job", json={"job_id": "b", "message_id": "m1", "title": "x"}, headers=sign()
    )
    assert again.status_code == 200, again.text
    assert again.json() == {"queued": False, "duplicate": True, "job": original}

    # Not broadcast: the next frame out is the next new job, not the duplicate.
    later = await api.post("/job", json={"job_id": "c"}, headers=sign())
    assert (await next_broadcast(broadcasts))["id"] == later.json()["job"]["id"]
    # Not queued: the original and the later job, once each.
    claimed = [
        (await api.get("/job/next", headers=sign())).json()["job"]["job_id"]
        for _ in range(2)
    ]
    assert claimed == ["a", "c"]
    assert (await api.get("/job/next", headers=sign())).status_code == 204
    assert await count_jobs() == 2


async def test_duplicate_of_a_claimed_job_is_still_a_duplicate(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    await api.post("/job", json={"job_id": "a", "message_id": "m1"}, headers=sign())
    assert (await api.get("/job/next", headers=sign())).status_code == 200
    again = await api.post(
        "/job", json={"job_id": "a", "message_id": "m1"}, headers=sign()
    )
    assert again.status_code == 200
    assert (await api.get("/job/next", headers=sign())).status_code == 204


async def test_job_id_is_a_duplicate_within_the_window(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    """DEDUP_WINDOW_SECONDS (60 by default): less than 60 s ago is a duplicate."""
    with time_machine.travel(MOMENT, tick=False) as clock:
        first = await api.post("/job", json={"job_id": "a"}, headers=sign())
        clock.shift(59.999)
        again = await api.post("/job", json={"job_id": "a"}, headers=sign())
        clock.shift(0.001)
        later = await api.post("/job", json={"job_id": "a"}, headers=sign())
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["job"] == first.json()["job"]
    assert later.status_code == 201
    assert later.json()["job"]["id"] != first.json()["job"]["id"]
    assert await count_jobs() == 2


async def test_dedup_window_is_configurable(
    api: httpx.AsyncClient, sign: Sign, settings: Settings
) -> None:
    settings.DEDUP_WINDOW_SECONDS = 5
    with time_machine.travel(MOMENT, tick=False) as clock:
        await api.post("/job", json={"job_id": "a"}, headers=sign())
        clock.shift(4)
        again = await api.post("/job", json={"job_id": "a"}, headers=sign())
        clock.shift(1)
        later = await api.post("/job", json={"job_id": "a"}, headers=sign())
    assert [again.status_code, later.status_code] == [200, 201]


async def test_dedup_window_zero_turns_job_id_dedup_off(
    api: httpx.AsyncClient, sign: Sign, settings: Settings
) -> None:
    settings.DEDUP_WINDOW_SECONDS = 0
    statuses = [
        (await api.post("/job", json={"job_id": "a"}, headers=sign())).status_code
        for _ in range(2)
    ]
    assert statuses == [201, 201]
    # message_id duplicates are still caught.
    await api.post("/job", json={"job_id": "b", "message_id": "m"}, headers=sign())
    again = await api.post(
        "/job", json={"job_id": "b", "message_id": "m"}, headers=sign()
    )
    assert again.status_code == 200


async def test_concurrent_duplicates_store_one_job(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    responses = await asyncio.gather(
        *(
            api.post("/job", json={"job_id": "a", "message_id": "m"}, headers=sign())
            for _ in range(5)
        )
    )
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 200, 201]
    assert len({r.json()["job"]["id"] for r in responses}) == 1
    assert await count_jobs() == 1


# --- Bad input ----------------------------------------------------------------


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"job_id": "a", "color": "red"}, "color"),
    ({"job_id": "a", "ttl": 5, "JobId": "a"}, "JobId"),
    ({}, "job_id"),
    ({"place_id": 1}, "job_id"),
    ({"job_id": ""}, "job_id"),
    ({"job_id": "a" * 65}, "job_id"),
    ({"job_id": "jöb-ü"}, "job_id"),
    ({"job_id": "工作"}, "job_id"),
    ({"job_id": "a b"}, "job_id"),
    ({"job_id": "a/../b"}, "job_id"),
    ({"job_id": 12345}, "job_id"),
    ({"job_id": None}, "job_id"),
    ({"job_id": "a", "place_id": True}, "place_id"),
    ({"job_id": "a", "place_id": "109983668079237"}, "place_id"),
    ({"job_id": "a", "place_id": -1}, "place_id"),
    ({"job_id": "a", "place_id": 1.5}, "place_id"),
    ({"job_id": "a", "place_id": 2**63}, "place_id"),
    ({"job_id": "a", "fields": []}, "fields"),
    ({"job_id": "a", "fields": "Name: x"}, "fields"),
    ({"job_id": "a", "fields": {"Players": 3}}, "fields"),
    ({"job_id": "a", "fields": {"Players": None}}, "fields"),
    ({"job_id": "a", "fields": {"Players": {"now": "3"}}}, "fields"),
    ({"job_id": "a", "ttl": 0}, "ttl"),
    ({"job_id": "a", "ttl": -1}, "ttl"),
    ({"job_id": "a", "ttl": 86401}, "ttl"),
    ({"job_id": "a", "ttl": "5"}, "ttl"),
    ({"job_id": "a", "ttl": True}, "ttl"),
    ({"job_id": "a", "ttl": 1.5}, "ttl"),
    ({"job_id": "a", "title": "t" * 257}, "title"),
    ({"job_id": "a", "title": 5}, "title"),
    ({"job_id": "a", "channel": "has space"}, "channel"),
    ({"job_id": "a", "channel": ""}, "channel"),
    ({"job_id": "a", "source": "x" * 65}, "source"),
    ({"job_id": "a", "message_id": 1390098765432109876}, "message_id"),
    # Text no database can store: refused here, not by PostgreSQL.
    ({"job_id": "a", "title": "a\x00b"}, "title"),
    ({"job_id": "a", "title": "half a pair \ud83d"}, "title"),
    ({"job_id": "a", "fields": {"Name": "x\x00"}}, "fields"),
    ({"job_id": "a", "fields": {"Na\x00me": "x"}}, "fields"),
    ({"job_id": "a", "fields": {"Name": "\udc00"}}, "fields"),
]


@pytest.mark.parametrize(("payload", "field"), BAD_FIELDS)
def test_bad_field_is_named(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_job(json.dumps(payload).encode())
    assert caught.value.code == "bad_field"
    assert repr(field) in caught.value.detail


# Through the API, one of each kind: the view passes the parser's answer on.
@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"job_id": "a", "color": "red"}, "color"),
        ({}, "job_id"),
        ({"job_id": "jöb-ü"}, "job_id"),
        ({"job_id": "a", "place_id": True}, "place_id"),
        ({"job_id": "a", "fields": {"Players": 3}}, "fields"),
        ({"job_id": "a", "ttl": -1}, "ttl"),
        ({"job_id": "a", "ttl": "5"}, "ttl"),
        ({"job_id": "a", "title": "t" * 257}, "title"),
        ({"job_id": "a", "title": "a\x00b"}, "title"),
        ({"job_id": "a", "fields": {"Name": "\udc00"}}, "fields"),
    ],
)
async def test_bad_field_is_a_400_that_stores_nothing(
    api: httpx.AsyncClient, sign: Sign, payload: dict[str, Any], field: str
) -> None:
    # Sent as ASCII JSON, as most encoders do: a lone surrogate is then an
    # escape ("\\udc00"), which the body can carry and the database could not.
    headers = {**sign(), "Content-Type": "application/json"}
    response = await api.post("/job", content=json.dumps(payload), headers=headers)
    detail = assert_error(response, 400, "bad_field")
    assert repr(field) in detail
    assert await count_jobs() == 0


async def test_nan_ttl_is_a_bad_field(api: httpx.AsyncClient, sign: Sign) -> None:
    # Python's json accepts NaN; the contract's whole seconds do not.
    response = await api.post(
        "/job",
        content=b'{"job_id": "a", "ttl": NaN}',
        headers={**sign(), "Content-Type": "application/json"},
    )
    assert "'ttl'" in assert_error(response, 400, "bad_field")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b'{"job_id": "a",}',
        b"[1, 2]",
        b'[{"job_id": "a"}]',
        b'"job_id"',
        b"null",
        b"42",
        b"\xff\xfe{",
        b'{"job_id": "a"} trailing',
    ],
)
async def test_body_that_is_not_a_json_object(
    api: httpx.AsyncClient, sign: Sign, body: bytes
) -> None:
    response = await api.post(
        "/job", content=body, headers={**sign(), "Content-Type": "application/json"}
    )
    assert_error(response, 400, "bad_json")
    assert await count_jobs() == 0


def nested(depth: int, inner: bytes = b"1") -> bytes:
    """``depth`` arrays within one another around ``inner``."""
    return b"[" * depth + inner + b"]" * depth


@pytest.mark.parametrize(
    "body",
    [
        nested(65),
        nested(1200),
        b'{"a": ' * 1200 + b"1" + b"}" * 1200,
        # Deep inside an otherwise valid job.
        b'{"job_id": "a", "fields": {"x": ' + nested(63) + b"}}",
    ],
    ids=["65", "1200", "1200-objects", "in-fields"],
)
async def test_json_nested_too_deep_is_bad_json_not_a_500(
    api: httpx.AsyncClient, sign: Sign, body: bytes
) -> None:
    response = await api.post(
        "/job", content=body, headers={**sign(), "Content-Type": "application/json"}
    )
    detail = assert_error(response, 400, "bad_json")
    assert "more than 64 levels deep" in detail
    assert await count_jobs() == 0


def test_json_nested_to_the_limit_is_parsed() -> None:
    # Depth 64 reaches the validation of the fields, which refuses a list.
    with pytest.raises(PayloadError) as refused:
        parse_job(b'{"job_id": "a", "fields": {"x": ' + nested(62) + b"}}")
    assert refused.value.code == "bad_field"


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=40,
)


@given(
    st.one_of(
        st.binary(max_size=256),
        _json_values.map(lambda value: json.dumps(value).encode()),
        st.integers(1, 3000).map(nested),
        st.tuples(st.integers(0, 200), _json_values).map(
            lambda pair: (
                b'{"job_id": "a", "fields": '
                + nested(pair[0], json.dumps(pair[1]).encode())
                + b"}"
            )
        ),
    )
)
@hypothesis_settings(max_examples=300, deadline=None)
def test_any_body_is_a_job_or_a_400(body: bytes) -> None:
    refusal: PayloadError | None = None
    try:
        parse_job(body)
    except PayloadError as exc:  # anything else (RecursionError...) fails the test
        refusal = exc
    assert refusal is None or (
        refusal.code in {"bad_json", "bad_field"} and refusal.detail
    )


def job_of_size(size: int) -> bytes:
    """A valid job of exactly ``size`` bytes."""
    head, tail = b'{"job_id": "big", "fields": {"v": "', b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_body_at_max_job_bytes_is_accepted(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    body = job_of_size(16384)
    response = await api.post(
        "/job", content=body, headers={**sign(), "Content-Type": "application/json"}
    )
    assert response.status_code == 201, response.text


async def test_max_job_bytes_is_configurable(
    api: httpx.AsyncClient, sign: Sign, settings: Settings
) -> None:
    settings.MAX_JOB_BYTES = 300
    headers = {**sign(), "Content-Type": "application/json"}
    fits = await api.post("/job", content=job_of_size(300), headers=headers)
    assert fits.status_code == 201, fits.text
    over = await api.post("/job", content=job_of_size(301), headers=headers)
    assert_error(over, 413, "too_large")


async def test_413_over_max_job_bytes_with_content_length(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    body = job_of_size(16385)
    response = await api.post(
        "/job", content=body, headers={**sign(), "Content-Type": "application/json"}
    )
    assert response.request.headers["content-length"] == "16385"
    assert_error(response, 413, "too_large")
    assert await count_jobs() == 0


@pytest.mark.parametrize("size", [16385, 3_000_000])
async def test_413_over_max_job_bytes_without_content_length(
    api: httpx.AsyncClient, sign: Sign, size: int
) -> None:
    """A chunked body declares no length; it is measured once read."""
    body = job_of_size(size)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    response = await api.post(
        "/job",
        content=chunks(),
        headers={**sign(), "Content-Type": "application/json"},
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "too_large")
    assert await count_jobs() == 0


async def test_body_longer_than_declared_stores_nothing(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    response = await api.post(
        "/job",
        content=job_of_size(20000),
        headers={**sign(), "Content-Type": "application/json", "Content-Length": "20"},
    )
    assert 400 <= response.status_code < 500
    assert set(response.json()) == {"error", "detail"}
    assert await count_jobs() == 0


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        None,
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
        "text/json",
    ],
)
async def test_415_unless_the_body_is_json(
    api: httpx.AsyncClient, sign: Sign, content_type: str | None
) -> None:
    headers = sign()
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = await api.post("/job", content=b'{"job_id": "a"}', headers=headers)
    assert response.request.headers.get("content-type") == content_type
    assert_error(response, 415, "unsupported_media_type")
    assert await count_jobs() == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
async def test_wrong_method(api: httpx.AsyncClient, sign: Sign, method: str) -> None:
    response = await api.request(method, "/job", json={"job_id": "a"}, headers=sign())
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert await count_jobs() == 0
