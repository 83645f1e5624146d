"""Configuration (contract section 6): typed parsers, precedence, refusing to serve."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from gateway_project import server
from gateway_project.config import (
    Config,
    available_cores,
    parse_bool,
    parse_choice,
    parse_float,
    parse_int,
    parse_list,
    parse_url,
    redact_url,
)
from testkit.servers import REPO_ROOT
from tests import stack

# --- The typed parsers --------------------------------------------------------


def rejects(parser: Any, value: Any, **bounds: Any) -> str:
    """The message of the ImproperlyConfigured ``parser`` raises for ``value``."""
    with pytest.raises(ImproperlyConfigured) as caught:
        parser("SOME_SETTING", value, **bounds)
    message = str(caught.value)
    # A typo is found from the message alone: it names the variable and value.
    assert "SOME_SETTING" in message
    return message


@pytest.mark.parametrize(
    ("value", "expected"), [("5", 5), (" 7 ", 7), ("-3", -3), (42, 42), ("0", 0)]
)
def test_parse_int_reads_whole_numbers(value: Any, expected: int) -> None:
    assert parse_int("SOME_SETTING", value) == expected


@pytest.mark.parametrize("value", ["abc", "1.5", "", "5s", True, "1e3"])
def test_parse_int_rejects_the_rest(value: Any) -> None:
    assert repr(value) in rejects(parse_int, value)


def test_parse_int_bounds() -> None:
    assert parse_int("SOME_SETTING", "1", minimum=1, maximum=3) == 1
    assert parse_int("SOME_SETTING", "3", minimum=1, maximum=3) == 3
    assert "0" in rejects(parse_int, "0", minimum=1)
    assert "4" in rejects(parse_int, "4", maximum=3)


@pytest.mark.parametrize(
    ("value", "expected"), [("0.25", 0.25), (" 1 ", 1.0), (2, 2.0), (0.05, 0.05)]
)
def test_parse_float_reads_numbers(value: Any, expected: float) -> None:
    assert parse_float("SOME_SETTING", value) == expected


@pytest.mark.parametrize("value", ["fast", "", "nan", "inf", "-inf", True, "1,5"])
def test_parse_float_rejects_the_rest(value: Any) -> None:
    assert repr(value) in rejects(parse_float, value)


def test_parse_float_bounds() -> None:
    assert parse_float("SOME_SETTING", "0", minimum=0.0) == 0.0
    assert "-0.1" in rejects(parse_float, "-0.1", minimum=0.0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[(text, True) for text in ("1", "true", "TRUE", "yes", "on", " True ")],
        *[(text, False) for text in ("0", "false", "False", "no", "off", "")],
        (True, True),
        (False, False),
    ],
)
def test_parse_bool_reads_true_and_false(value: Any, expected: bool) -> None:
    assert parse_bool("SOME_SETTING", value) is expected


@pytest.mark.parametrize("value", ["maybe", "2", "enabled", "y"])
def test_parse_bool_rejects_the_rest(value: str) -> None:
    assert repr(value) in rejects(parse_bool, value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a", ["a"]),
        ("a, b,,c ", ["a", "b", "c"]),
        ("", []),
        (["x", " y ", ""], ["x", "y"]),
        ([1390012345678901234], ["1390012345678901234"]),
    ],
)
def test_parse_list_reads_strings_and_lists(value: Any, expected: list[str]) -> None:
    assert parse_list("SOME_SETTING", value) == expected


@pytest.mark.parametrize("value", [5, {"a": "b"}, [None], [["nested"]], True])
def test_parse_list_rejects_the_rest(value: Any) -> None:
    assert repr(value) in rejects(parse_list, value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://discord.com/api/v10", "https://discord.com/api/v10"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        # Render's hostport of a service: plain HTTP on the private network.
        ("job-gateway-a1b2:8000", "http://job-gateway-a1b2:8000"),
        ("job-gateway-a1b2", "http://job-gateway-a1b2"),
        (" http://[::1]:8000/prefix ", "http://[::1]:8000/prefix"),
    ],
)
def test_parse_url_reads_urls_and_bare_host_ports(value: str, expected: str) -> None:
    parsed = parse_url(
        "SOME_SETTING",
        value,
        schemes=("http", "https"),
        bare_scheme="http",
        example="x",
    )
    assert parsed == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("not-a-url", "a URL starting http:// or https://"),
        ("ftp://host", "a URL starting http:// or https://"),
        ("http://", "a URL (http:// or https://) that names a host"),
        ("http://host:99999", "with a port from 1 to 65535"),
        ("http://host:port", "with a port from 1 to 65535"),
        ("http://ho st", "without spaces"),
        ("http://host/#top", "without a #fragment"),
    ],
)
def test_parse_url_says_what_it_expected(value: str, expected: str) -> None:
    message = rejects(
        parse_url, value, schemes=("http", "https"), example="http://127.0.0.1:8000"
    )
    assert expected in message
    assert repr(value) in message
    assert "like http://127.0.0.1:8000" in message


def test_a_unix_socket_names_a_path_instead_of_a_host() -> None:
    url = "unix:///run/redis/redis.sock?db=0"
    assert parse_url("R", url, schemes=("redis", "unix"), example="x") == url
    assert "that names a host" in rejects(
        parse_url, "unix://", schemes=("redis", "unix"), example="x"
    )


def test_a_bare_host_is_not_a_url_where_none_is_implied() -> None:
    assert "a URL starting redis://" in rejects(
        parse_url, "localhost:6379", schemes=("redis",), example="redis://h:6379"
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgres://user:pw@host:5432/db", "postgres://user:***@host:5432/db"),
        ("rediss://:pw@host:6379", "rediss://:***@host:6379"),
        ("redis://host:6379/0?password=pw", "redis://host:6379/0?***"),
        ("redis://host?password=pw", "redis://host?***"),
        ("http://user@host/", "http://user@host/"),
        ("not a url", "not a url"),
        ("postgres://u:a/b@c@host/db", "postgres://u:***@host/db"),
    ],
)
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_parse_choice() -> None:
    assert parse_choice("SOME_SETTING", "warning", ("INFO", "WARNING")) == "WARNING"
    assert "one of INFO, WARNING" in rejects(
        parse_choice, "loud", choices=("INFO", "WARNING")
    )


# --- Where values come from ---------------------------------------------------


def load(tmp_path: Path, environ: dict[str, str], file: Any = None) -> Config:
    """A ``Config`` over ``environ`` and, when given, a settings file of ``file``."""
    if file is not None:
        (tmp_path / "app_settings.json").write_text(json.dumps(file))
    return Config.load(environ, tmp_path)


def test_environment_wins_over_the_file_which_wins_over_defaults(
    tmp_path: Path,
) -> None:
    config = load(
        tmp_path,
        {"PORT": "9000"},
        {"PORT": 8100, "JOB_TTL_SECONDS": 120},
    )
    assert config.integer("PORT", 8000) == 9000
    assert config.integer("JOB_TTL_SECONDS", 300) == 120
    assert config.integer("DEDUP_WINDOW_SECONDS", 60) == 60


def test_file_values_keep_their_json_types(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {},
        {"HEADLESS_MODE": False, "CHANNEL_ID": ["1", "2"], "BURST_POLL_SECONDS": 0.1},
    )
    assert config.boolean("HEADLESS_MODE", True) is False
    assert config.strings("CHANNEL_ID") == ["1", "2"]
    assert config.number("BURST_POLL_SECONDS", 0.05) == 0.1


def test_a_bad_file_value_is_named(tmp_path: Path) -> None:
    config = load(tmp_path, {}, {"RATE_LIMIT_PER_MINUTE": "lots"})
    with pytest.raises(ImproperlyConfigured, match=r"RATE_LIMIT_PER_MINUTE.*'lots'"):
        config.integer("RATE_LIMIT_PER_MINUTE", 0)


def test_empty_environment_values_fall_back(tmp_path: Path) -> None:
    config = load(tmp_path, {"PORT": "", "REDIS_URL": ""}, {"PORT": 8100})
    assert config.integer("PORT", 8000) == 8000
    assert config.string("REDIS_URL") is None


def test_settings_file_is_optional_by_default(tmp_path: Path) -> None:
    config = Config.load({}, tmp_path)
    assert config.integer("PORT", 8000) == 8000


def test_settings_file_names_another_file(tmp_path: Path) -> None:
    (tmp_path / "prod.json").write_text('{"PORT": 8100}')
    relative = Config.load({"SETTINGS_FILE": "prod.json"}, tmp_path)
    absolute = Config.load({"SETTINGS_FILE": str(tmp_path / "prod.json")}, Path("/"))
    assert relative.integer("PORT", 8000) == absolute.integer("PORT", 8000) == 8100


def test_an_explicit_settings_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"SETTINGS_FILE .*missing\.json"):
        Config.load({"SETTINGS_FILE": "missing.json"}, tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"PORT"'])
def test_settings_file_must_hold_a_json_object(tmp_path: Path, text: str) -> None:
    (tmp_path / "app_settings.json").write_text(text)
    with pytest.raises(ImproperlyConfigured, match="SETTINGS_FILE"):
        Config.load({}, tmp_path)


# --- Processes refusing to start ----------------------------------------------


def run(argv: list[str], **env: str | None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the project with this environment, ``None`` values removed."""
    environ = {**os.environ, **{k: v for k, v in env.items() if v is not None}}
    for name, value in env.items():
        if value is None:
            environ.pop(name, None)
    return subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.processes
@pytest.mark.parametrize(
    ("removed", "named"),
    [
        (["API_KEY"], "API_KEY"),
        (["HMAC_SECRET"], "HMAC_SECRET"),
        (["API_KEY", "HMAC_SECRET"], "API_KEY, HMAC_SECRET"),
        (["DJANGO_SECRET_KEY"], "DJANGO_SECRET_KEY"),
    ],
)
def test_serving_refuses_to_start_without_secrets(
    removed: list[str], named: str
) -> None:
    result = run(
        [sys.executable, "-c", "import gateway_project.asgi"],
        **dict.fromkeys(removed),
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Refusing to serve: {named} not set."
    ]


@pytest.mark.processes
def test_daphne_refuses_to_start_without_the_api_key() -> None:
    result = run(
        [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            "0",
            "gateway_project.asgi:application",
        ],
        API_KEY=None,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["Refusing to serve: API_KEY not set."]


@pytest.mark.processes
def test_serving_freezes_what_start_up_loaded_and_collects_less_often() -> None:
    script = (
        "import gc, gateway_project.asgi as asgi; "
        "print(gc.get_freeze_count(), gc.get_threshold()[0], "
        "asgi.YOUNG_COLLECTION_EVERY)"
    )
    result = run([sys.executable, "-c", script])
    assert result.returncode == 0, result.stderr
    frozen, young, configured = map(int, result.stdout.split())
    assert frozen > 50_000  # Django, the gateway and their modules
    assert young == configured > 700  # CPython's default


@pytest.mark.processes
def test_management_commands_need_no_secrets() -> None:
    result = run(
        [sys.executable, "manage.py", "check"],
        API_KEY=None,
        HMAC_SECRET=None,
        DJANGO_SECRET_KEY=None,
    )
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


@pytest.mark.processes
def test_a_bad_value_stops_start_up_naming_it() -> None:
    result = run([sys.executable, "manage.py", "check"], RATE_LIMIT_PER_MINUTE="lots")
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "Refusing to start: RATE_LIMIT_PER_MINUTE must be a whole number of at "
        "least 0, not 'lots'."
    ]


DAPHNE = [
    sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", "0",
    "gateway_project.asgi:application",
]  # fmt: skip
# Each bad start: the setting, its value, and the line that refuses it.
BAD_VALUES = [
    (
        "DISCORD_POLL_SECONDS",
        "fast",
        "DISCORD_POLL_SECONDS must be a number of at least 0.0, not 'fast'.",
    ),
    (
        "JOB_TTL_SECONDS",
        "abc",
        "JOB_TTL_SECONDS must be a whole number from 1 to 86400, not 'abc'.",
    ),
    (
        "JOB_TTL_SECONDS",
        "0",
        "JOB_TTL_SECONDS must be a whole number from 1 to 86400, not '0'.",
    ),
    (
        "HTTPS_ONLY",
        "sometimes",
        "HTTPS_ONLY must be true or false (or yes/no, on/off, 1/0), not 'sometimes'.",
    ),
    (
        "LOG_LEVEL",
        "loud",
        "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; not 'loud'.",
    ),
    (
        "DISCORD_API_BASE",
        "not-a-url",
        "DISCORD_API_BASE must be a URL starting https:// or http://, like "
        "https://discord.com/api/v10; not 'not-a-url'.",
    ),
    (
        "SERVICE_BASE_URL",
        "ftp://gateway.example",
        "SERVICE_BASE_URL must be a URL starting http:// or https://, like "
        "http://127.0.0.1:8000 or job-gateway-a1b2:8000; not 'ftp://gateway.example'.",
    ),
    (
        "REDIS_URL",
        "localhost:6379",
        "REDIS_URL must be a URL starting redis://, rediss:// or unix://, like "
        "redis://127.0.0.1:6379/0; not 'localhost:6379'.",
    ),
    (
        "DATABASE_URL",
        "postgres://gateway:hunter2-secret@db:5432x/jobs",
        "DATABASE_URL must be a database URL, like "
        "postgres://user:password@host:5432/name or sqlite:///path/to/db.sqlite3; "
        "not 'postgres://gateway:***@db:5432x/jobs'.",
    ),
    (
        "DATABASE_URL",
        "postgresql//gateway:hunter2-secret@db/jobs",
        "DATABASE_URL must be a database URL, like "
        "postgres://user:password@host:5432/name or sqlite:///path/to/db.sqlite3; "
        "not 'postgresql//gateway:***@db/jobs'.",
    ),
]


@pytest.mark.processes
@pytest.mark.parametrize(
    ("argv", "refusal"),
    [
        (DAPHNE, "Refusing to serve"),
        ([sys.executable, "manage.py", "runpoller", "--once"], "Refusing to start"),
        ([sys.executable, "manage.py", "migrate"], "Refusing to start"),
    ],
    ids=["daphne", "runpoller", "migrate"],
)
@pytest.mark.parametrize(("name", "value", "line"), BAD_VALUES)
def test_every_bad_start_is_one_line_naming_setting_value_and_expectation(
    argv: list[str], refusal: str, name: str, value: str, line: str
) -> None:
    result = run(argv, **{name: value})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"{refusal}: {line}"]
    assert "hunter2" not in result.stderr  # a password in a URL is never shown


@pytest.mark.processes
def test_a_bad_settings_file_value_is_one_line_too(tmp_path: Path) -> None:
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps({"MAX_JOB_BYTES": 12}))
    result = run(
        [sys.executable, "manage.py", "prunejobs"], SETTINGS_FILE=str(settings_file)
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Refusing to start: MAX_JOB_BYTES must be a whole number of at least 256, "
        "not 12."
    ]


# --- Processes (manage.py serve) ------------------------------------------------


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000", "all"),
        ("50000 100000", 1),  # half a core still runs one process
        ("200000 100000", 2),
        (None, "all"),  # no cgroup v2 file
        ("garbled", "all"),
    ],
)
def test_available_cores_follow_a_cgroup_quota(
    tmp_path: Path, cpu_max: str | None, expected: int | str
) -> None:
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    cores = len(os.sched_getaffinity(0))
    want = cores if expected == "all" else min(cores, int(expected))
    assert available_cores(tmp_path) == want


_PRINT_PROCESSES = (
    "import django; django.setup(); from django.conf import settings; "
    "print(settings.WEB_CONCURRENCY)"
)


@pytest.mark.processes
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"REDIS_URL": ""}, "1"),
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, str(available_cores())),
        ({"REDIS_URL": "", "WEB_CONCURRENCY": "3"}, "3"),
    ],
)
def test_web_concurrency_is_every_core_with_redis_and_one_without(
    env: dict[str, str], expected: str
) -> None:
    result = run([sys.executable, "-c", _PRINT_PROCESSES], **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.parametrize("value", ["0", "65", "many"])
def test_a_bad_web_concurrency_stops_start_up(value: str) -> None:
    result = run([sys.executable, "manage.py", "check"], WEB_CONCURRENCY=value)
    assert result.returncode != 0
    assert result.stderr == (
        "Refusing to start: WEB_CONCURRENCY must be a whole number from 1 to 64, "
        f"not {value!r}.\n"
    )


# --- The admin login's throttle -------------------------------------------------

_PRINT_THROTTLE = (
    "import django; django.setup(); from django.conf import settings; "
    "print(settings.AXES_FAILURE_LIMIT, settings.AXES_COOLOFF_TIME.total_seconds())"
)


@pytest.mark.processes
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "5 900.0"),
        (
            {"ADMIN_LOGIN_FAILURE_LIMIT": "3", "ADMIN_LOGIN_COOLOFF_MINUTES": "60"},
            "3 3600.0",
        ),
        (
            {"ADMIN_LOGIN_FAILURE_LIMIT": " 1 ", "ADMIN_LOGIN_COOLOFF_MINUTES": "1440"},
            "1 86400.0",
        ),
    ],
)
def test_admin_login_throttle_settings_reach_axes(
    env: dict[str, str], expected: str
) -> None:
    result = run(
        [sys.executable, "-c", _PRINT_THROTTLE],
        DJANGO_SETTINGS_MODULE="gateway_project.settings",
        **env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.processes
@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ADMIN_LOGIN_FAILURE_LIMIT", "0", "from 1 to 100, not '0'"),
        ("ADMIN_LOGIN_FAILURE_LIMIT", "101", "from 1 to 100, not '101'"),
        ("ADMIN_LOGIN_FAILURE_LIMIT", "five", "from 1 to 100, not 'five'"),
        ("ADMIN_LOGIN_COOLOFF_MINUTES", "0", "from 1 to 1440, not '0'"),
        ("ADMIN_LOGIN_COOLOFF_MINUTES", "1441", "from 1 to 1440, not '1441'"),
        ("ADMIN_LOGIN_COOLOFF_MINUTES", "2.5", "from 1 to 1440, not '2.5'"),
        ("ADMIN_LOGIN_COOLOFF_MINUTES", "15m", "from 1 to 1440, not '15m'"),
    ],
)
def test_a_bad_admin_login_throttle_value_stops_start_up(
    name: str, value: str, message: str
) -> None:
    result = run([sys.executable, "manage.py", "check"], **{name: value})
    assert result.returncode != 0
    assert result.stderr == (
        f"Refusing to start: {name} must be a whole number {message}.\n"
    )


# --- The test suite's own isolation -------------------------------------------


def test_the_suite_clears_every_setting_the_code_reads() -> None:
    pattern = re.compile(r"""config\.[a-z_]+\(\s*["']([A-Z][A-Z0-9_]*)["']""")
    read = {
        name
        for package in ("gateway_project", "jobs", "discord_poller")
        for path in (REPO_ROOT / package).rglob("*.py")
        for name in pattern.findall(path.read_text())
    }
    set_by_the_stack = {"API_KEY", "HMAC_SECRET", "DJANGO_SECRET_KEY"}
    set_by_the_stack |= {"TEST_SQLITE_FILE", "AUTH_FAILURE_DELAY_SECONDS"}
    assert "TIERS" in read  # the pattern finds the settings
    read.add(server.LEAVE_OUT_VARIABLE)  # read by the seam itself, for benchmarks
    assert read - set_by_the_stack <= stack._SETTINGS_FROM_THE_SHELL


@pytest.mark.processes
def test_the_claim_timeout_is_a_setting() -> None:
    script = "from django.conf import settings; print(settings.CLAIM_TIMEOUT_SECONDS)"
    shell = [sys.executable, "manage.py", "shell", "-c", script]
    assert run(shell).stdout.split()[-1] == "30.0"
    assert run(shell, CLAIM_TIMEOUT_SECONDS="2.5").stdout.split()[-1] == "2.5"
    refused = run([sys.executable, "manage.py", "check"], CLAIM_TIMEOUT_SECONDS="0")
    assert refused.returncode != 0
    assert refused.stderr == (
        "Refusing to start: CLAIM_TIMEOUT_SECONDS must be a number from 1.0 to "
        "3600.0, not '0'.\n"
    )
