"""The admin login's throttle as served: the ASGI application, and a real daphne.

The admin runs on Django's async handler there (gateway_project.asgi), where
axes' middleware takes another path than under Django's test client
(tests/test_admin_login.py): the lockout page must come out of it too.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from asgiref.sync import sync_to_async
from axes.models import AccessAttempt
from django.contrib.auth.models import User

from testkit.servers import DaphneProcess
from tests.conftest import process_env

pytestmark = pytest.mark.backends

LOGIN = "/admin/login/"
PASSWORD = "correct horse battery staple"
WRONG = "hunter2-but-wrong"
WRONG_FORM = "Please enter the correct username and password"
LOCKED_PAGE = "Too many failed sign-ins"


def _form(page: httpx.Response, username: str, password: str) -> dict[str, str]:
    assert page.status_code == 200, page.text[:500]
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token, page.text[:500]
    return {
        "csrfmiddlewaretoken": token.group(1),
        "username": username,
        "password": password,
        "next": "/admin/",
    }


def log_in(
    http: httpx.Client, username: str, password: str, **headers: str
) -> httpx.Response:
    """The admin's login form as a browser submits it: its page, then a POST."""
    form = _form(http.get(LOGIN, headers=headers), username, password)
    return http.post(LOGIN, data=form, headers=headers)


async def alog_in(
    http: httpx.AsyncClient, username: str, password: str
) -> httpx.Response:
    form = _form(await http.get(LOGIN), username, password)
    return await http.post(LOGIN, data=form)


def assert_locked(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text[:500]
    assert LOCKED_PAGE in response.text
    assert response.headers["content-type"].startswith("text/html")
    assert int(response.headers["retry-after"]) > 0


# --- The ASGI application, in process -------------------------------------------


@pytest.fixture
async def asgi(transactional_db: None) -> AsyncIterator[httpx.AsyncClient]:
    """A browser at 203.0.113.7 in front of the gateway's ASGI application."""
    from gateway_project.asgi import application

    transport = httpx.ASGITransport(app=application, client=("203.0.113.7", 5000))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost"
    ) as client:
        yield client


async def test_the_async_admin_answers_a_lockout_with_the_page(
    asgi: httpx.AsyncClient,
) -> None:
    await sync_to_async(User.objects.create_superuser)("boss", password=PASSWORD)
    for _ in range(4):
        refused = await alog_in(asgi, "boss", WRONG)
        assert refused.status_code == 200
        assert WRONG_FORM in refused.text
    assert_locked(await alog_in(asgi, "boss", WRONG))
    assert_locked(await alog_in(asgi, "boss", PASSWORD))
    assert (await asgi.get("/admin/")).status_code == 302  # still logged out


# --- A real daphne ----------------------------------------------------------------


@pytest.mark.processes
def test_daphne_locks_the_login_for_the_account_and_the_address(
    transactional_db: None,
) -> None:
    User.objects.create_superuser("boss", password=PASSWORD)
    User.objects.create_superuser("other", password=PASSWORD)
    env = process_env(
        ADMIN_LOGIN_FAILURE_LIMIT="3",
        ADMIN_LOGIN_COOLOFF_MINUTES="30",
        TRUSTED_PROXY_COUNT="1",
    )
    # Behind the one trusted proxy the test plays, the address is the
    # X-Forwarded-For entry it appended.
    here = {"X-Forwarded-For": "192.0.2.1, 198.51.100.9"}
    elsewhere = {"X-Forwarded-For": "198.51.100.9, 198.51.100.10"}
    with DaphneProcess(env=env) as daphne:
        with httpx.Client(base_url=daphne.base_url, timeout=30) as http:
            for _ in range(2):
                refused = log_in(http, "boss", WRONG, **here)
                assert refused.status_code == 200, refused.text[:500]
                assert WRONG_FORM in refused.text
            assert_locked(log_in(http, "boss", WRONG, **here))
            # The right password is refused too, while the lockout lasts.
            assert_locked(log_in(http, "boss", PASSWORD, **here))
            assert http.get("/admin/").status_code == 302

        assert list(AccessAttempt.objects.values_list("ip_address", flat=True)) == [
            "198.51.100.9"
        ]

        # The lockout is in the database: a restarted gateway still refuses.
        daphne.restart()
        with httpx.Client(base_url=daphne.base_url, timeout=30) as http:
            assert_locked(log_in(http, "boss", PASSWORD, **here))
            # The account is locked from every address...
            assert_locked(log_in(http, "boss", PASSWORD, **elsewhere))
            # ...and the address for every account.
            assert_locked(log_in(http, "other", PASSWORD, **here))
            # Another account from another address is not concerned.
            logged_in = log_in(http, "other", PASSWORD, **elsewhere)
            assert logged_in.status_code == 302, logged_in.text[:500]
            assert logged_in.headers["location"] == "/admin/"
            assert http.get("/admin/", headers=elsewhere).status_code == 200
