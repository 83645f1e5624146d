"""Where settings come from, and one typed parser per kind of value.

The environment wins over the JSON file named by ``SETTINGS_FILE`` (default
``app_settings.json``, optional), which wins over the defaults. Every parser
raises ``ImproperlyConfigured`` naming the variable and the value it could not
read, so a typo stops the process at start-up instead of surprising it later.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# user:password@ in a URL, the password running to the last @.
_PASSWORD = re.compile(r"(?P<user>[^:/?#@\s]*):\S*@")


def parse_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Read a whole number, within bounds when given."""
    expected = "a whole number" + _range(minimum, maximum)
    if isinstance(value, bool):
        raise ImproperlyConfigured(f"{name} must be {expected}, not {value!r}.")
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} must be {expected}, not {value!r}."
        ) from None
    _check_bounds(name, number, minimum, maximum, value)
    return number


def parse_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """Read a decimal number, within bounds when given."""
    expected = "a number" + _range(minimum, maximum)
    if isinstance(value, bool):
        raise ImproperlyConfigured(f"{name} must be {expected}, not {value!r}.")
    try:
        number = float(str(value).strip()) if not isinstance(value, float) else value
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} must be {expected}, not {value!r}."
        ) from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ImproperlyConfigured(
            f"{name} must be a finite number{_range(minimum, maximum)}, not {value!r}."
        )
    _check_bounds(name, number, minimum, maximum, value)
    return number


def parse_bool(name: str, value: Any) -> bool:
    """Read true/false, yes/no, on/off or 1/0; anything else is an error."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name} must be true or false (or yes/no, on/off, 1/0), not {value!r}."
    )


def parse_list(name: str, value: Any) -> list[str]:
    """Read a comma-separated string or a JSON list of strings; blanks dropped."""
    if isinstance(value, list):
        if not all(isinstance(item, str | int) for item in value):
            raise ImproperlyConfigured(
                f"{name} must be a list of strings, not {value!r}."
            )
        items = [str(item) for item in value]
    elif isinstance(value, str):
        items = value.split(",")
    else:
        raise ImproperlyConfigured(
            f"{name} must be a comma-separated list, not {value!r}."
        )
    return [item.strip() for item in items if item.strip()]


def parse_json_object(name: str, value: Any) -> dict[str, Any]:
    """Read a JSON object, given as one (settings file) or as JSON text (env)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ImproperlyConfigured(
                f"{name} must be a JSON object, not {value!r}."
            ) from None
    if not isinstance(value, dict):
        raise ImproperlyConfigured(f"{name} must be a JSON object, not {value!r}.")
    return value


def parse_choice(name: str, value: Any, choices: Collection[str]) -> str:
    """Read one of ``choices``, in any letter case; returned as listed."""
    text = str(value).strip()
    for choice in choices:
        if text.lower() == choice.lower():
            return choice
    listed = ", ".join(choices)
    raise ImproperlyConfigured(f"{name} must be one of {listed}; not {value!r}.")


def parse_url(
    name: str,
    value: Any,
    *,
    schemes: Collection[str],
    bare_scheme: str | None = None,
    example: str,
) -> str:
    """Read a URL whose scheme is one of ``schemes`` and that names a host.

    With ``bare_scheme``, a bare ``host:port`` (what a platform hands over for
    a service's private address) is read as ``<bare_scheme>://host:port``.
    Passwords never appear in the error.
    """
    text = str(value).strip()
    if bare_scheme is not None and text and "://" not in text:
        text = f"{bare_scheme}://{text}"
    problem = _url_problem(text, schemes)
    if problem:
        raise ImproperlyConfigured(
            f"{name} must be {problem}, like {example}; not {redact_url(str(value))!r}."
        )
    return text


def _url_problem(text: str, schemes: Collection[str]) -> str | None:
    """What ``text`` lacks to be a URL of one of ``schemes``; None if nothing."""
    *others, last = [f"{scheme}://" for scheme in schemes]
    wanted = f"{', '.join(others)} or {last}" if others else last
    if any(character.isspace() for character in text):
        return f"a URL ({wanted}) without spaces"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return f"a URL ({wanted}) with a port from 1 to 65535"
    if parts.scheme.lower() not in schemes:
        return f"a URL starting {wanted}"
    # unix:///path/to/redis.sock names a socket file instead of a host.
    if not parts.hostname and not (parts.scheme.lower() == "unix" and parts.path):
        return f"a URL ({wanted}) that names a host"
    if parts.fragment:
        return f"a URL ({wanted}) without a #fragment"
    return None


def redact_url(text: str) -> str:
    """``text`` with any password in it, and its query, replaced by ``***``.

    Malformed URLs too (``postgresql//user:password@host``): they are the ones
    an error shows.
    """
    scheme, found, rest = text.partition("://")
    if not found:
        scheme, rest = "", text
    rest, question, _ = rest.partition("?")
    # Greedy to the last @: a password may hold / or @.
    rest = _PASSWORD.sub(r"\g<user>:***@", rest, count=1)
    query = "?***" if question else ""
    return f"{scheme}://{rest}{query}" if found else f"{rest}{query}"


def _range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" of at least {minimum}"
    if maximum is not None:
        return f" of at most {maximum}"
    return ""


def _check_bounds(
    name: str,
    number: float,
    minimum: float | None,
    maximum: float | None,
    value: Any,
) -> None:
    if (minimum is not None and number < minimum) or (
        maximum is not None and number > maximum
    ):
        what = "a whole number" if isinstance(number, int) else "a number"
        raise ImproperlyConfigured(
            f"{name} must be {what}{_range(minimum, maximum)}, not {value!r}."
        )


def exit_on_bad_settings(refusal: str = "Refusing to start") -> None:
    """Load Django's settings; on a bad value, exit with one line naming it.

    For the entry points (``manage.py``, the ASGI module), which would
    otherwise print a traceback dozens of lines long around that one line.
    """
    from django.conf import settings

    try:
        settings.INSTALLED_APPS  # noqa: B018 - loads the settings module
    except ImproperlyConfigured as exc:
        sys.exit(f"{refusal}: {exc}")


def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may run on: its CPU affinity, under any cgroup quota.

    A container sees the host's cores (``os.cpu_count()``) while its quota
    (cgroup v2 ``cpu.max``, "quota period") may allow a fraction of one.
    """
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, int(quota) // int(period)))


class Config:
    """Settings read from the environment, then a JSON file, then defaults."""

    def __init__(
        self, environ: Mapping[str, str], file_values: Mapping[str, Any]
    ) -> None:
        self._environ = environ
        self._file_values = file_values

    @classmethod
    def load(cls, environ: Mapping[str, str], base_dir: Path) -> Config:
        """Read ``SETTINGS_FILE`` (relative to ``base_dir``) if it exists."""
        path = Path(environ.get("SETTINGS_FILE", "app_settings.json"))
        if not path.is_absolute():
            path = base_dir / path
        explicit = "SETTINGS_FILE" in environ
        if not path.exists():
            if explicit:
                raise ImproperlyConfigured(
                    f"SETTINGS_FILE {str(path)!r} does not exist."
                )
            return cls(environ, {})
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ImproperlyConfigured(
                f"SETTINGS_FILE {str(path)!r} is not readable JSON: {exc}"
            ) from None
        if not isinstance(values, dict):
            raise ImproperlyConfigured(
                f"SETTINGS_FILE {str(path)!r} must hold a JSON object."
            )
        return cls(environ, values)

    def raw(self, name: str) -> Any:
        """The value as given, or None when neither source sets it."""
        if name in self._environ:
            return self._environ[name]
        return self._file_values.get(name)

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.raw(name)
        if value is None or value == "":
            return default
        return str(value)

    def integer(self, name: str, default: int, **bounds: int) -> int:
        value = self.raw(name)
        return default if value in (None, "") else parse_int(name, value, **bounds)

    def number(self, name: str, default: float, **bounds: float) -> float:
        value = self.raw(name)
        return default if value in (None, "") else parse_float(name, value, **bounds)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        return default if value is None else parse_bool(name, value)

    def choice(self, name: str, default: str, choices: Collection[str]) -> str:
        value = self.raw(name)
        return default if value in (None, "") else parse_choice(name, value, choices)

    def url(
        self,
        name: str,
        default: str,
        *,
        schemes: Collection[str],
        bare_scheme: str | None = None,
        example: str,
    ) -> str:
        value = self.raw(name)
        if value in (None, ""):
            return default
        return parse_url(
            name, value, schemes=schemes, bare_scheme=bare_scheme, example=example
        )

    def json_object(self, name: str) -> dict[str, Any]:
        value = self.raw(name)
        return {} if value in (None, "") else parse_json_object(name, value)

    def strings(self, name: str, default: list[str] | None = None) -> list[str]:
        value = self.raw(name)
        if value is None:
            return list(default or [])
        return parse_list(name, value)
