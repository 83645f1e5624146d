"""Numbers read from a job's fields: ``"$10M/s"`` is 10000000, ``"3/8"`` players.

Keys are the field names in snake case without emoji or punctuation
(``"💰 Money per sec"`` → ``money_per_sec``). Text that is not a number is left
out. Decimal arithmetic keeps ``"1.2B"`` exactly 1200000000.

Notifiers write numbers in their locale's notation, and ``parse_number`` reads
them all: ``12.5M`` and ``12,5M``; ``1,250,000``, ``1.250.000``, ``1 250 000``
and ``1'250'000``; ``1,250,000.5`` and ``1.250.000,5``. The separators decide:

- a space (plain, no-break or thin) or an apostrophe only groups thousands;
- with both ``.`` and ``,``, the last one is the decimal mark;
- a mark written more than once groups thousands;
- a single mark followed by 1, 2, 4 or more digits, or after a lone ``0``, is
  the decimal mark: ``12,5M``, ``0.125``;
- a single mark followed by exactly three digits reads differently by locale
  (``1,250`` is 1250 in English, 1.25 in German). Without a suffix it groups
  thousands, in both notations: ``1,250`` and ``1.250`` are 1250, as an amount
  of three decimals and no unit is not a thing notifiers write. With a suffix,
  ``.`` is the decimal mark (``1.250M`` is 1250000, as abbreviated amounts are
  written, ``format_number`` included) and ``,`` is left out: ``1,250M``
  could be 1.25 million or 1,250 million, and a filter must not guess.

Groups of thousands must be whole: ``1,25,000`` and ``1.2.3`` are left out.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation

Number = int | float

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
_CURRENCY = r"(?:R\$|[$€£¥₽₹])"
# Spaces that group thousands: plain, no-break, narrow no-break, thin.
_SPACES = " \u00a0\u202f\u2009"
_APOSTROPHES = "'\u2019"
_NUMBER_RE = re.compile(
    rf"""
    (?P<before>{_CURRENCY})?\s*
    (?P<sign>[-+])?\s*
    (?P<after_sign>{_CURRENCY})?\s*
    (?P<digits>\d+(?:[.,{_SPACES}{_APOSTROPHES}]\d+)*)
    \s*(?P<suffix>[kmbt])?
    \s*(?P<after>{_CURRENCY})?
    \s*(?:/\s*s(?:ec(?:ond)?)?|per\s+sec(?:ond)?)?
    """,
    re.IGNORECASE | re.VERBOSE,
)
_SEPARATOR_RE = re.compile(rf"[.,{_SPACES}{_APOSTROPHES}]")
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
    currencies = [match[part] for part in ("before", "after_sign", "after")]
    if sum(1 for currency in currencies if currency) > 1:
        return None
    suffix = (match["suffix"] or "").lower()
    split = _split_digits(match["digits"], has_suffix=bool(suffix))
    if split is None:
        return None
    whole, fraction = split
    literal = f"{match['sign'] or ''}{whole}.{fraction or '0'}"
    try:
        value = Decimal(literal) * _SUFFIXES[suffix]
    except InvalidOperation:  # pragma: no cover - the pattern admits digits only
        return None
    if value == value.to_integral_value():
        return int(value)
    return float(value)


def _split_digits(text: str, *, has_suffix: bool) -> tuple[str, str] | None:
    """The whole and fractional digits ``text`` writes, by the module's rules.

    None when the separators say nothing consistent, or when they could mean
    two different numbers.
    """
    groups = _SEPARATOR_RE.split(text)
    marks = [_kind(mark) for mark in _SEPARATOR_RE.findall(text)]
    if not marks:
        return text, ""
    decimal_at: int | None = None  # the index in marks of the decimal mark
    points = [i for i, mark in enumerate(marks) if mark in ".,"]
    if points and marks[points[-1]] != marks[points[0]]:
        # Both . and ,: the last is the decimal mark, and the last separator.
        decimal_at = points[-1]
        if decimal_at != len(marks) - 1 or marks.count(marks[decimal_at]) > 1:
            return None
    elif len(points) == 1 and points[0] == len(marks) - 1:
        mark, after = marks[points[0]], groups[-1]
        if len(after) != 3 or groups[0] == "0" or len(marks) > 1:
            decimal_at = points[0]
        elif has_suffix:
            if mark == ",":
                return None  # 1,250M: 1.25 million, or 1,250 million?
            decimal_at = points[0]
    grouped = marks if decimal_at is None else marks[:decimal_at]
    whole = groups if decimal_at is None else groups[: decimal_at + 1]
    if len(set(grouped)) > 1:
        return None  # one kind of separator groups a number's thousands
    if grouped and not _whole_groups(whole):
        return None
    fraction = "" if decimal_at is None else groups[-1]
    return "".join(whole), fraction


def _kind(mark: str) -> str:
    """A separator's kind: ``.``, ``,``, a space, or an apostrophe."""
    if mark in _SPACES:
        return " "
    if mark in _APOSTROPHES:
        return "'"
    return mark


def _whole_groups(groups: list[str]) -> bool:
    """Whether ``groups`` are thousands: 1 to 3 digits, then 3 each."""
    first, rest = groups[0], groups[1:]
    return (
        1 <= len(first) <= 3
        and not (first.startswith("0") and len(groups) > 1)
        and all(len(group) == 3 for group in rest)
    )


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
