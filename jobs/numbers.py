"""Numbers read from a job's fields: ``"$10M/s"`` is 10000000, ``"3/8"`` players.

Keys are the field names in snake case without emoji or punctuation
(``"💰 Money per sec"`` → ``money_per_sec``). Text that is not a number is left
out. Decimal arithmetic keeps ``"1.2B"`` exactly 1200000000.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation

Number = int | float

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
_NUMBER_RE = re.compile(
    r"""
    [$€£¥]?\s*
    (?P<sign>[-+])?
    (?P<digits>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<fraction>\d+))?
    \s*(?P<suffix>[kmbt])?
    \s*(?:/\s*s(?:ec(?:ond)?)?|per\s+sec(?:ond)?)?
    """,
    re.IGNORECASE | re.VERBOSE,
)
_RATIO_RE = re.compile(r"(\d{1,9})\s*/\s*(\d{1,9})")
_NOT_WORD_RE = re.compile(r"[^a-z0-9]+")
MAX_VALUE_LENGTH = 64


def snake_key(name: str) -> str:
    """``"💰 Money per sec"`` → ``"money_per_sec"``; empty when nothing is left."""
    ascii_name = (
        unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    )
    return _NOT_WORD_RE.sub("_", ascii_name.lower()).strip("_")


def parse_number(text: str) -> Number | None:
    """The number a value states, or None when it is not (only) a number."""
    if len(text) > MAX_VALUE_LENGTH:
        return None
    match = _NUMBER_RE.fullmatch(text.strip())
    if match is None:
        return None
    digits = match["digits"].replace(",", "")
    literal = f"{match['sign'] or ''}{digits}.{match['fraction'] or '0'}"
    try:
        value = Decimal(literal) * _SUFFIXES[(match["suffix"] or "").lower()]
    except InvalidOperation:  # pragma: no cover - the pattern admits digits only
        return None
    if value == value.to_integral_value():
        return int(value)
    return float(value)


def format_number(value: int) -> str:
    """The shortest exact notifier text for ``value``: ``10500000`` is ``10.5M``."""
    for suffix in ("T", "B", "M", "K"):
        unit = _SUFFIXES[suffix.lower()]
        if abs(value) >= unit:
            scaled = (Decimal(value) / unit).normalize()
            text = f"{scaled:f}"
            return f"{text}{suffix}"
    return str(value)


def numbers_from_fields(fields: dict[str, str]) -> dict[str, Number]:
    """Every number the fields state, keyed by snake-case field name."""
    numbers: dict[str, Number] = {}
    for name, text in fields.items():
        key = snake_key(name)
        if not key or key in numbers:
            continue
        if "player" in key:
            ratio = _RATIO_RE.fullmatch(text.strip())
            if ratio is not None:
                numbers[key] = int(ratio[1])
                numbers[f"{key}_max"] = int(ratio[2])
                continue
        number = parse_number(text)
        if number is not None:
            numbers[key] = number
    return numbers
