import pytest




async def test_post_then_claim(api, sign, queue_backend):
    r = await api.post("/job", json={"job_id": "abc"}, headers=sign())
    assert r.status_code == 201, r.text
    r = await api.get("/job/next", headers=sign())
    assert r.status_code == 200
    assert r.json()["job"]["job_id"] == "abc"
    r = await api.get("/job/next", headers=sign())
    assert r.status_code == 204


def test_live(live_gateway, sign):
    import httpx
    r = httpx.post(live_gateway.base_url + "/job", json={"job_id": "x"}, headers=sign())
    assert r.status_code == 201, r.text
