"""The admin login's throttle (django-axes, ``jobs.adminlogin``), with Django's client.

After ``ADMIN_LOGIN_FAILURE_LIMIT`` (5) wrong passwords for one account or from
one address, attempts are refused with our page, status 429, until
``ADMIN_LOGIN_COOLOFF_MINUTES`` (15) have passed. Through a real daphne:
tests/test_admin_login_live.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from axes.models import AccessAttempt
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client, RequestFactory
from pytest_django import Settings

from jobs.adminlogin import LOCKED_TEMPLATE, client_address

pytestmark = pytest.mark.backends

LOGIN = "/admin/login/"
PASSWORD = "correct horse battery staple"
WRONG = "hunter2-but-wrong"
WRONG_FORM = "Please enter the correct username and password"
LOCKED_PAGE = "Too many failed sign-ins"
LIMIT = 5
COOL_OFF = timedelta(minutes=15)
START = datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _fast_hashes(settings: Settings) -> None:
    # The default hasher costs a good part of a second per login; what is
    # tested here is the counting, not the hashing.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def boss(db: None) -> User:
    return User.objects.create_superuser("boss", password=PASSWORD)


@pytest.fixture
def clock() -> Iterator[time_machine.Traveller]:
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


def attempt(
    username: str,
    password: str,
    address: str = "203.0.113.7",
    forwarded_for: str | None = None,
) -> Any:
    """One POST of the admin's login form, from ``address``, in a new session."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return Client().post(
        LOGIN,
        {"username": username, "password": password, "next": "/admin/"},
        headers=headers,
        REMOTE_ADDR=address,
    )


def assert_refused_form(response: Any) -> None:
    """The login form again, saying the password was wrong: not locked (yet)."""
    assert response.status_code == 200
    assert WRONG_FORM in response.content.decode()


def assert_locked(response: Any) -> str:
    """The lockout page; returns its text."""
    assert response.status_code == 429, response.content[:500]
    page: str = response.content.decode()
    assert LOCKED_PAGE in page
    assert int(response["Retry-After"]) >= 1
    return page


def assert_logged_in(response: Any) -> None:
    assert response.status_code == 302, response.content[:500]
    assert response["Location"] == "/admin/"


# --- Per account, per address -------------------------------------------------


def test_wrong_passwords_for_one_account_lock_it_from_every_address(
    boss: User,
) -> None:
    User.objects.create_superuser("other", password=PASSWORD)
    for n in range(1, LIMIT):
        assert_refused_form(attempt("boss", WRONG, f"198.51.100.{n}"))
    # The limit-th failure is refused with the page, whatever the address.
    assert_locked(attempt("boss", WRONG, "198.51.100.50"))
    assert_locked(attempt("boss", PASSWORD, "198.51.100.51"))
    # Another account, from another address, is not concerned.
    assert_logged_in(attempt("other", PASSWORD, "198.51.100.52"))


def test_wrong_passwords_from_one_address_lock_every_account_there(
    boss: User,
) -> None:
    for n in range(1, LIMIT):
        assert_refused_form(attempt(f"guess-{n}", WRONG, "203.0.113.7"))
    assert_locked(attempt("guess-last", WRONG, "203.0.113.7"))
    assert_locked(attempt("boss", PASSWORD, "203.0.113.7"))
    # The account itself is not locked: its owner, elsewhere, logs in.
    assert_logged_in(attempt("boss", PASSWORD, "203.0.113.8"))


def test_under_the_limit_the_right_password_works(boss: User) -> None:
    for _ in range(LIMIT - 1):
        assert_refused_form(attempt("boss", WRONG))
    assert_logged_in(attempt("boss", PASSWORD))


def test_the_limit_is_a_setting(boss: User, settings: Settings) -> None:
    settings.AXES_FAILURE_LIMIT = 2
    assert_refused_form(attempt("boss", WRONG))
    assert_locked(attempt("boss", WRONG))


def test_a_lockout_lives_in_the_database(boss: User) -> None:
    # Not in a cache that could evict it or empty on a restart.
    for _ in range(LIMIT):
        attempt("boss", WRONG)
    rows = AccessAttempt.objects.values_list(
        "username", "ip_address", "failures_since_start"
    )
    assert list(rows) == [("boss", "203.0.113.7", LIMIT)]
    # The password typed is never stored.
    assert WRONG not in AccessAttempt.objects.get().post_data


def test_a_login_does_not_clear_the_count(boss: User) -> None:
    # Otherwise one account of one's own would reset an address's count
    # between guesses at another.
    for _ in range(LIMIT - 1):
        attempt("boss", WRONG)
    assert_logged_in(attempt("boss", PASSWORD))
    assert_locked(attempt("boss", WRONG))


def test_a_failure_is_logged_with_the_address_never_what_was_typed(
    boss: User, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="axes"):
        attempt("secret-typed-as-a-name", WRONG, "203.0.113.7")
    lines = [record.getMessage() for record in caplog.records]
    assert any("203.0.113.7" in line and LOGIN in line for line in lines), lines
    assert not any("secret-typed-as-a-name" in line for line in lines), lines
    assert not any(WRONG in line for line in lines), lines


def test_an_administrator_lifts_a_lockout_sooner(boss: User) -> None:
    # The commands docs/security.md gives.
    for _ in range(LIMIT):
        attempt("boss", WRONG, "198.51.100.1")
    call_command("axes_reset_username", "boss")
    assert_logged_in(attempt("boss", PASSWORD, "198.51.100.1"))

    for n in range(LIMIT):
        attempt(f"guess-{n}", WRONG, "203.0.113.7")
    assert_locked(attempt("boss", PASSWORD, "203.0.113.7"))
    call_command("axes_reset_ip", "203.0.113.7")
    assert_logged_in(attempt("boss", PASSWORD, "203.0.113.7"))

    for _ in range(LIMIT):
        attempt("boss", WRONG, "198.51.100.2")
    call_command("axes_reset")
    assert_logged_in(attempt("boss", PASSWORD, "198.51.100.2"))


# --- The page and the cool-down -------------------------------------------------


def test_the_page_says_what_happened_and_when_to_try_again(
    boss: User, clock: time_machine.Traveller
) -> None:
    for _ in range(LIMIT - 1):
        attempt("boss", WRONG)
    clock.shift(timedelta(minutes=2))  # the last failure, two minutes later
    response = attempt("boss", WRONG)
    page = assert_locked(response)
    assert LOCKED_TEMPLATE in [template.name for template in response.templates]
    assert "5 wrong passwords" in page
    assert "15 minutes" in page
    # Fifteen minutes after the failure that reached the limit.
    assert "12:17:00 UTC" in page
    assert 'datetime="2026-03-02T12:17:00+00:00"' in page
    assert "in 15\xa0minutes" in page
    assert response["Retry-After"] == str(15 * 60)
    assert response["Cache-Control"] == "no-store"
    assert response["Content-Type"].startswith("text/html")
    assert WRONG not in page


def test_the_right_password_works_again_after_the_cool_down(
    boss: User, clock: time_machine.Traveller
) -> None:
    for _ in range(LIMIT):
        attempt("boss", WRONG)
    # Knocking during the lockout, right or wrong, does not extend it.
    clock.shift(timedelta(minutes=10))
    assert_locked(attempt("boss", WRONG))
    page = assert_locked(attempt("boss", PASSWORD))
    assert "12:15:00 UTC" in page
    clock.move_to(START + COOL_OFF - timedelta(seconds=1))
    response = attempt("boss", PASSWORD)
    assert_locked(response)
    assert response["Retry-After"] == "1"

    clock.move_to(START + COOL_OFF + timedelta(seconds=1))
    client = Client(REMOTE_ADDR="203.0.113.7")
    logged_in = client.post(LOGIN, {"username": "boss", "password": PASSWORD})
    assert logged_in.status_code == 302
    assert client.get("/admin/").status_code == 200


def test_the_cool_down_is_a_setting(
    boss: User, settings: Settings, clock: time_machine.Traveller
) -> None:
    settings.AXES_COOLOFF_TIME = timedelta(minutes=2)
    for _ in range(LIMIT):
        attempt("boss", WRONG)
    assert "12:02:00 UTC" in assert_locked(attempt("boss", PASSWORD))
    clock.shift(timedelta(minutes=2, seconds=1))
    assert_logged_in(attempt("boss", PASSWORD))


def test_the_later_of_two_lockouts_is_the_time_shown(
    boss: User, clock: time_machine.Traveller
) -> None:
    # The address locks at 12:00, the account at 12:05: an attempt at the
    # account from that address waits for both.
    for n in range(LIMIT):
        attempt(f"guess-{n}", WRONG, "203.0.113.7")
    clock.shift(timedelta(minutes=5))
    for n in range(LIMIT):
        attempt("boss", WRONG, f"198.51.100.{n}")
    page = assert_locked(attempt("boss", PASSWORD, "203.0.113.7"))
    assert "12:20:00 UTC" in page


# --- The client's address: the API's rule ---------------------------------------


def test_behind_a_trusted_proxy_the_address_is_the_one_it_vouches_for(
    boss: User, settings: Settings
) -> None:
    settings.TRUSTED_PROXY_COUNT = 1
    proxy = "10.0.0.2"
    for n in range(LIMIT):
        # What the client writes itself (left) changes; what the proxy
        # appended (right) does not.
        forwarded = f"192.0.2.{n}, 198.51.100.9"
        attempt(f"guess-{n}", WRONG, proxy, forwarded_for=forwarded)
    assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {
        "198.51.100.9"
    }
    assert_locked(attempt("boss", PASSWORD, proxy, forwarded_for="198.51.100.9"))
    # Writing another address first changes nothing.
    spoofed = "198.51.100.10, 198.51.100.9"
    assert_locked(attempt("boss", PASSWORD, proxy, forwarded_for=spoofed))
    # Another client behind the same proxy logs in.
    assert_logged_in(attempt("boss", PASSWORD, proxy, forwarded_for="198.51.100.10"))


def test_without_a_trusted_proxy_forwarded_for_is_ignored(boss: User) -> None:
    for n in range(LIMIT):
        forwarded = f"192.0.2.{n}"
        attempt(f"guess-{n}", WRONG, "203.0.113.7", forwarded_for=forwarded)
    assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {
        "203.0.113.7"
    }
    response = attempt("boss", PASSWORD, "203.0.113.7", forwarded_for="192.0.2.200")
    assert_locked(response)


@pytest.mark.parametrize(
    ("remote_addr", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("unknown", None),
        ("", None),
    ],
)
def test_client_address_is_an_address_or_none(
    remote_addr: str, expected: str | None, rf: RequestFactory
) -> None:
    request = rf.post(LOGIN, REMOTE_ADDR=remote_addr)
    assert client_address(request) == expected


def test_attempts_with_no_address_are_counted_together(boss: User) -> None:
    # A Unix socket gives no address: such clients share one count, and the
    # page is still the page (an address column refuses "unknown").
    for n in range(LIMIT - 1):
        assert_refused_form(attempt(f"guess-{n}", WRONG, ""))
    assert_locked(attempt("guess-last", WRONG, ""))
    assert_locked(attempt("boss", PASSWORD, ""))
    assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {None}
