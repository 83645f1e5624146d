"""JSON nested past 64 levels is a 400 ``bad_json``, never a 500, through daphne."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.sync.client import connect

from gateway_client.signing import signed_headers
from tests.conftest import LiveGateway, assert_error
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = pytest.mark.backends


def test_a_deep_body_and_a_deep_frame_are_bad_json(live_gateway: LiveGateway) -> None:
    headers = {
        **signed_headers(API_KEY, HMAC_SECRET),
        "Content-Type": "application/json",
    }
    body = b"[" * 1200 + b"]" * 1200
    with httpx.Client(base_url=live_gateway.base_url, timeout=30) as client:
        response = client.post("/job", content=body, headers=headers)
    assert "more than 64 levels deep" in assert_error(response, 400, "bad_json")

    url = f"{live_gateway.ws_url}/ws?api_key={API_KEY}"
    with connect(url, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        ws.send("[" * 2000 + "]" * 2000)
        error = json.loads(ws.recv(timeout=10))
        assert error["error"] == "bad_json"
        assert "more than 64 levels deep" in error["detail"]
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "pong"
