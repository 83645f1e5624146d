"""Validation of a posted job (contract section 4): bytes in, a clean draft out."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Channel names become channel-layer group names, which allow only these.
CHANNEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TTL_SECONDS = 86400
MAX_FIELDS = 100
# Arrays and objects within one another, at most (the outermost is level 1).
MAX_JSON_DEPTH = 64

ALLOWED_KEYS = frozenset(
    {"job_id", "place_id", "channel", "message_id", "title", "fields", "ttl", "source"}
)


class PayloadError(ValueError):
    """The body is not a valid job; ``code`` is ``bad_json`` or ``bad_field``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class JobDraft:
    """A validated job, not yet stored."""

    job_id: str
    place_id: int | None = None
    channel: str = "api"
    source: str = "api"
    message_id: str | None = None
    title: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    ttl: int | None = None


def parse_job(body: bytes) -> JobDraft:
    """Parse and validate a ``POST /job`` body; raise ``PayloadError`` if it is bad."""
    data = load_json(body, what="body")
    if not isinstance(data, dict):
        raise PayloadError("bad_json", "The body must be a JSON object.")
    return draft_from_mapping(data)


def load_json(text: bytes | str, *, what: str) -> Any:
    """Decode JSON from a client; raise ``PayloadError`` (``bad_json``) if it is bad.

    Nesting past ``MAX_JSON_DEPTH`` is refused like a syntax error: no job
    nests more than three levels, and ``json`` recurses once per level, so a
    body of a few kilobytes of brackets would otherwise end in a
    ``RecursionError``.
    """
    try:
        data = json.loads(text)
    except RecursionError:
        raise _too_deep(what) from None
    except (ValueError, UnicodeDecodeError):
        raise PayloadError("bad_json", f"The {what} is not valid JSON.") from None
    if _deeper_than(data, MAX_JSON_DEPTH):
        raise _too_deep(what)
    return data


def _too_deep(what: str) -> PayloadError:
    return PayloadError(
        "bad_json", f"The {what} nests more than {MAX_JSON_DEPTH} levels deep."
    )


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether ``data`` has arrays or objects nested more than ``limit`` deep."""
    # The containers at one level, then the next, ``limit`` times.
    level: list[Any] = [data] if isinstance(data, dict | list) else []
    for _ in range(limit):
        if not level:
            return False
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, dict | list)
        ]
    return bool(level)


def draft_from_mapping(data: dict[str, Any]) -> JobDraft:
    """Validate a decoded job object."""
    if "numbers" in data:
        # The gateway reads numbers from the fields itself (jobs.numbers), so
        # that a filter means the same for every job, whoever posted it.
        raise _bad("numbers", "is set by the gateway from 'fields'; send the text")
    unknown = sorted(set(data) - ALLOWED_KEYS)
    if unknown:
        raise _bad(unknown[0], "is not a job field")
    if "job_id" not in data:
        raise _bad("job_id", "is required")
    return JobDraft(
        job_id=_pattern(data, "job_id", JOB_ID_RE, "1-64 letters, digits, - or _"),
        place_id=_place_id(data.get("place_id")),
        channel=_optional_pattern(data, "channel", CHANNEL_RE) or "api",
        source=_optional_pattern(data, "source", JOB_ID_RE) or "api",
        message_id=_optional_pattern(data, "message_id", JOB_ID_RE),
        title=_optional_text(data, "title", 256),
        fields=_fields(data.get("fields")),
        ttl=_ttl(data.get("ttl")),
    )


def _bad(name: str, problem: str) -> PayloadError:
    return PayloadError("bad_field", f"Field {name!r} {problem}.")


def _pattern(
    data: dict[str, Any], name: str, pattern: re.Pattern[str], rule: str
) -> str:
    value = data[name]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _bad(name, f"must be {rule}")
    return value


def _optional_pattern(
    data: dict[str, Any], name: str, pattern: re.Pattern[str]
) -> str | None:
    if data.get(name) is None:
        return None
    return _pattern(data, name, pattern, "1-64 letters, digits, - or _")


def _optional_text(data: dict[str, Any], name: str, max_length: int) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_length:
        raise _bad(name, f"must be a string of at most {max_length} characters")
    return _storable(name, value)


def _storable(name: str, text: str) -> str:
    """``text``, if every database can store it.

    JSON may carry a NUL (``\\u0000``) or half of a surrogate pair; neither
    is text PostgreSQL (or UTF-8) can hold, so the job is refused here rather
    than by the database.
    """
    if "\x00" in text:
        raise _bad(name, "must not contain NUL characters")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise _bad(name, "must be valid Unicode (no unpaired surrogates)") from None
    return text


def _whole(value: Any) -> int | None:
    """``value`` as an int if it is a JSON integer, else None.

    JSON (and JSON Schema) make no difference between ``5`` and ``5.0``, and
    some encoders write the latter; a float is taken only while it is exact.
    """
    # bool is an int in Python, never a number here.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return None


def _place_id(value: Any) -> int | None:
    if value is None:
        return None
    place_id = _whole(value)
    if place_id is None or not 0 < place_id < 2**63:
        raise _bad("place_id", "must be a positive integer or null")
    return place_id


def _ttl(raw: Any) -> int | None:
    if raw is None:
        return None
    value = _whole(raw)
    if value is None:
        raise _bad("ttl", "must be a whole number of seconds")
    if not 1 <= value <= MAX_TTL_SECONDS:
        raise _bad("ttl", f"must be between 1 and {MAX_TTL_SECONDS} seconds")
    return value


def _fields(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("fields", "must be an object of strings")
    if len(value) > MAX_FIELDS:
        raise _bad("fields", f"must hold at most {MAX_FIELDS} entries")
    for name, text in value.items():
        if not isinstance(text, str):
            raise _bad("fields", f"entry {name!r} must be a string")
        _storable("fields", name)
        _storable("fields", text)
    return dict(value)
