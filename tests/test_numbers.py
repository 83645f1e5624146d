"""Numbers read from job fields (the building block of filters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discord_poller.embeds import parse_message
from jobs.numbers import format_number, numbers_from_fields, parse_number, snake_key

# Notifier embeds as they come in several locales, with the numbers each gives.
NOTIFIERS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "fixtures" / "notifier_numbers.json").read_text("utf-8")
)


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("$10M/s", 10_000_000),
        ("10.5m/s", 10_500_000),
        ("1.2B", 1_200_000_000),
        ("750K", 750_000),
        ("1,234", 1234),
        ("$1.5 M per second", 1_500_000),
        ("2T", 2_000_000_000_000),
        ("0.5", 0.5),
        ("-5", -5),
    ],
)
def test_value_formats(text: str, number: float) -> None:
    assert parse_number(text) == number


@pytest.mark.parametrize(
    ("text", "number"),
    [
        # A decimal comma, with a suffix, a currency and a rate.
        ("12,5M", 12_500_000),
        ("€12,5M/s", 12_500_000),
        ("12,5 M€/s", 12_500_000),
        ("0,75K", 750),
        ("12,50", 12.5),
        # Thousands grouped by dots, spaces (plain, no-break, thin) or apostrophes.
        ("1.250.000", 1_250_000),
        ("1 250 000", 1_250_000),
        ("1\u00a0250\u00a0000 €", 1_250_000),
        ("1\u202f250\u202f000", 1_250_000),
        ("1\u2009250", 1250),
        ("1'250'000/s", 1_250_000),
        ("1\u2019250", 1250),
        # A space before the suffix.
        ("12.5 M", 12_500_000),
        ("$12.5 m/s", 12_500_000),
        # Both marks: the last one is the decimal mark.
        ("1,250,000.5", 1_250_000.5),
        ("1.250.000,5", 1_250_000.5),
        ("€ 1.250,50", 1250.5),
        ("1 234,5", 1234.5),
        # One mark and three digits: thousands without a suffix, in both notations...
        ("1,250", 1250),
        ("1.250", 1250),
        ("$1,250/s", 1250),
        # ...the decimal point with one, as abbreviated amounts are written.
        ("1.250M", 1_250_000),
        ("-1.234K", -1234),
        # A lone 0 before the mark: a decimal, whatever follows.
        ("0,125", 0.125),
        ("0.125", 0.125),
        # Other currencies, before or after the sign.
        ("R$ 2,75B/s", 2_750_000_000),
        ("-$5", -5),
        ("$-5", -5),
        ("₹1,000", 1000),
    ],
)
def test_every_common_notation(text: str, number: float) -> None:
    assert parse_number(text) == number


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "10 apples",
        "3/8",
        "",
        "1.2.3",
        "M",
        # Ambiguous: 1.25 million, or 1,250 million?
        "1,250M",
        "$1,250M/s",
        # Groups that are not thousands, or two kinds of grouping.
        "1,25,000",
        "12 5M",
        "1.250 000",
        "0.250.000",
        # Two decimal marks, or a grouping mark after the decimal one.
        "1,000,000.5.5",
        "1.000,000,5",
        # Two currencies.
        "$5€",
    ],
)
def test_text_that_is_not_a_number(text: str) -> None:
    assert parse_number(text) is None


@pytest.mark.parametrize(
    "case", NOTIFIERS, ids=[case["notation"] for case in NOTIFIERS]
)
def test_notifier_formats_give_their_numbers(case: dict[str, Any]) -> None:
    job = parse_message(case["message"])
    assert job is not None
    assert numbers_from_fields(job.fields) == case["numbers"]


def test_numbers_from_fields() -> None:
    fields = {
        "💰 Money per sec": "$10M/s",
        "Players": "3/8",
        "Name": "La Grande Combinasion",
    }
    assert numbers_from_fields(fields) == {
        "money_per_sec": 10_000_000,
        "players": 3,
        "players_max": 8,
    }


def test_snake_key_drops_emoji_and_punctuation() -> None:
    assert snake_key("💰 Money/sec (PC)") == "money_sec_pc"


@given(st.text(max_size=80))
def test_parser_never_raises(text: str) -> None:
    parse_number(text)
    numbers_from_fields({text: text})


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_formatted_numbers_round_trip(number: int) -> None:
    assert parse_number(format_number(number)) == number


@given(
    st.integers(min_value=1, max_value=999),
    st.lists(st.integers(min_value=0, max_value=999), min_size=1, max_size=4),
    st.sampled_from([",", ".", " ", "\u00a0", "\u202f", "'"]),
)
def test_grouped_thousands_read_alike_in_every_notation(
    head: int, groups: list[int], separator: str
) -> None:
    text = separator.join([str(head), *(f"{group:03d}" for group in groups)])
    assert parse_number(text) == int(text.replace(separator, ""))
