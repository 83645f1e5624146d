"""Numbers read from job fields (the building block of filters)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.numbers import format_number, numbers_from_fields, parse_number, snake_key


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


@pytest.mark.parametrize("text", ["abc", "10 apples", "3/8", "", "1.2.3", "M"])
def test_text_that_is_not_a_number(text: str) -> None:
    assert parse_number(text) is None


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
