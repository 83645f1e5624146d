"""Where settings come from, and one typed parser per kind of value.

The environment wins over the JSON file named by ``SETTINGS_FILE`` (default
``app_settings.json``, optional), which wins over the defaults. Every parser
raises ``ImproperlyConfigured`` naming the variable and the value it could not
read, so a typo stops the process at start-up instead of surprising it later.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Read a whole number, within bounds when given."""
    if isinstance(value, bool):
        raise ImproperlyConfigured(f"{name} must be a whole number, not {value!r}.")
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} must be a whole number, not {value!r}."
        ) from None
    _check_bounds(name, number, minimum, maximum)
    return number


def parse_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """Read a decimal number, within bounds when given."""
    if isinstance(value, bool):
        raise ImproperlyConfigured(f"{name} must be a number, not {value!r}.")
    try:
        number = float(str(value).strip()) if not isinstance(value, float) else value
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, not {value!r}.") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ImproperlyConfigured(f"{name} must be a finite number, not {value!r}.")
    _check_bounds(name, number, minimum, maximum)
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


def _check_bounds(
    name: str, number: float, minimum: float | None, maximum: float | None
) -> None:
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {number}.")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name} must be at most {maximum}, not {number}.")


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

    def json_object(self, name: str) -> dict[str, Any]:
        value = self.raw(name)
        return {} if value in (None, "") else parse_json_object(name, value)

    def strings(self, name: str, default: list[str] | None = None) -> list[str]:
        value = self.raw(name)
        if value is None:
            return list(default or [])
        return parse_list(name, value)
