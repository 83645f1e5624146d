"""The filter language shared by ``GET /job/next`` and ``/ws``.

Repeated ``where=<key><op><value>`` clauses, all of which must hold:

- ``>=``, ``<=``, ``>``, ``<``, ``=``, ``!=`` compare a job's ``numbers``; the
  value is a number (``10M`` reads as 10000000) or another numbers key
  (``players<players_max``: not full);
- ``=`` and ``~`` (case-insensitive contains) on ``title`` or a field, by the
  field's snake-case name (``name~grande``); ``!=`` on text is "not equal".

``channels=A,B`` keeps those Discord channels only; ``tier=NAME`` uses an
operator-defined filter from ``TIERS``. A job without the key never matches.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs

from django.conf import settings

from jobs.numbers import Number, parse_number, snake_key
from jobs.payloads import CHANNEL_RE

MAX_CLAUSES = 20
MAX_CHANNELS = 50
MAX_VALUE_LENGTH = 256

_CLAUSE_RE = re.compile(
    r"(?P<key>[a-z0-9_]{1,64})(?P<op>>=|<=|!=|>|<|=|~)(?P<value>.+)", re.S
)
_KEY_RE = re.compile(r"[a-z0-9_]{1,64}")
_NUMERIC_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "=": operator.eq,
    "!=": operator.ne,
}


class FilterError(ValueError):
    """A filter that cannot be read; the message names the bad part."""


@dataclass(frozen=True)
class Clause:
    key: str
    op: str
    number: Number | None = None  # a literal number to compare with
    other_key: str | None = None  # or another numbers key
    text: str | None = None  # or text, lower-cased

    def matches(self, job: Mapping[str, Any], texts: Mapping[str, str]) -> bool:
        if self.text is not None:
            found = texts.get(self.key)
            if found is None:
                return False
            if self.op == "~":
                return self.text in found
            return (found == self.text) == (self.op == "=")
        numbers = job.get("numbers") or {}
        left = numbers.get(self.key)
        right = numbers.get(self.other_key) if self.other_key else self.number
        if not _is_number(left) or not _is_number(right):
            return False
        return _NUMERIC_OPS[self.op](left, right)

    def __str__(self) -> str:
        if self.text is not None:
            value = self.text
        elif self.other_key is not None:
            value = self.other_key
        else:
            value = str(self.number)
        return f"{self.key}{self.op}{value}"


@dataclass(frozen=True)
class JobFilter:
    """What a client asked for; hashable, so equal filters share one group."""

    clauses: tuple[Clause, ...] = ()
    channels: frozenset[str] | None = None

    @property
    def is_empty(self) -> bool:
        return not self.clauses and self.channels is None

    def matches(self, job: Mapping[str, Any]) -> bool:
        if self.channels is not None and job.get("channel") not in self.channels:
            return False
        if not self.clauses:
            return True
        # Reading the texts normalises every field name: only when asked for.
        texts = _texts(job) if self.reads_text else {}
        return all(clause.matches(job, texts) for clause in self.clauses)

    @property
    def reads_text(self) -> bool:
        """Whether a clause tests ``title`` or a field, not only ``numbers``."""
        return any(clause.text is not None for clause in self.clauses)

    def canonical(self) -> str:
        """One spelling per meaning: clause order and duplicates do not count."""
        parts = [f"where={clause}" for clause in sorted(set(self.clauses), key=str)]
        if self.channels is not None:
            parts.append("channels=" + ",".join(sorted(self.channels)))
        return "&".join(parts)

    def digest(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:24]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _texts(job: Mapping[str, Any]) -> dict[str, str]:
    texts = {
        snake_key(str(name)): str(value).lower()
        for name, value in (job.get("fields") or {}).items()
    }
    if job.get("title") is not None:
        texts["title"] = str(job["title"]).lower()
    return texts


def parse_clause(raw: str) -> Clause:
    """Read one ``where`` value; raise ``FilterError`` naming it when it is bad."""
    match = _CLAUSE_RE.fullmatch(raw.strip())
    if match is None:
        raise FilterError(
            f"where={raw!r} must be <key><op><value> with a snake_case key and an "
            "operator among >=, <=, >, <, =, !=, ~."
        )
    key, op, value = match["key"], match["op"], match["value"].strip()
    if not value or len(value) > MAX_VALUE_LENGTH:
        raise FilterError(
            f"where={raw!r} needs a value of 1-{MAX_VALUE_LENGTH} characters."
        )
    if op == "~":
        return Clause(key, op, text=value.lower())
    number = parse_number(value)
    if number is not None:
        return Clause(key, op, number=number)
    if op in ("=", "!="):
        return Clause(key, op, text=value.lower())
    if _KEY_RE.fullmatch(value):
        return Clause(key, op, other_key=value)
    raise FilterError(
        f"where={raw!r}: {op} compares numbers, and {value!r} is not one."
    )


def parse_channels(raw: str) -> frozenset[str]:
    channels = [channel.strip() for channel in raw.split(",")]
    if (
        not channels
        or len(channels) > MAX_CHANNELS
        or not all(CHANNEL_RE.fullmatch(channel) for channel in channels)
    ):
        raise FilterError(
            f"channels={raw!r} must be a comma-separated list of up to "
            f"{MAX_CHANNELS} channel ids."
        )
    return frozenset(channels)


def build_filter(
    where: Sequence[str],
    channels: str | None,
    tier: str | None,
    tiers: Mapping[str, JobFilter],
) -> JobFilter:
    """The filter a request asks for: its clauses and channels, and its tier's."""
    if len(where) > MAX_CLAUSES:
        raise FilterError(f"At most {MAX_CLAUSES} where= clauses.")
    clauses = tuple(parse_clause(raw) for raw in where)
    wanted = parse_channels(channels) if channels is not None else None
    if tier is not None:
        base = tiers.get(tier)
        if base is None:
            names = ", ".join(sorted(tiers)) or "none are configured"
            raise FilterError(f"tier={tier!r} is not a tier ({names}).")
        clauses = base.clauses + clauses
        if base.channels is not None:
            wanted = base.channels if wanted is None else base.channels & wanted
    return JobFilter(clauses, wanted)


def parse_filter_query(
    query: str, tiers: Mapping[str, JobFilter] | None = None
) -> JobFilter:
    """A filter from a query string such as ``where=a>=1&channels=X``."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise FilterError(f"{query!r} is not a query string.") from None
    unknown = set(params) - {"where", "channels", "tier"}
    if unknown:
        raise FilterError(f"{sorted(unknown)[0]!r} is not a filter parameter.")
    return build_filter(
        params.get("where", []),
        params["channels"][-1] if "channels" in params else None,
        params["tier"][-1] if "tier" in params else None,
        tiers or {},
    )


def parse_tiers(raw: Mapping[str, str]) -> dict[str, JobFilter]:
    """The ``TIERS`` setting: tier name to filter query; raise on a bad one."""
    tiers = {}
    for name, query in raw.items():
        if not isinstance(query, str):
            raise FilterError(f"Tier {name!r} must be a filter query string.")
        try:
            tiers[name] = parse_filter_query(query)
        except FilterError as exc:
            raise FilterError(f"Tier {name!r}: {exc}") from None
    return tiers


def configured_tiers() -> dict[str, JobFilter]:
    """The ``TIERS`` setting, read (and checked at start-up) by its parser."""
    raw = getattr(settings, "TIERS", None) or {}
    return _parsed_tiers(json.dumps(raw, sort_keys=True))


@lru_cache(maxsize=8)
def _parsed_tiers(raw: str) -> dict[str, JobFilter]:
    return parse_tiers(json.loads(raw))


def requested_filter(
    where: Sequence[str], channels: str | None, tier: str | None
) -> JobFilter:
    """The filter of a request to either interface, tiers as configured."""
    return build_filter(where, channels, tier, configured_tiers())
