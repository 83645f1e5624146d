"""The filter language: parsing, canonical form and matching."""

from __future__ import annotations

import pytest

from jobs.filters import FilterError, parse_filter_query, parse_tiers

JOB = {
    "channel": "111",
    "title": "Brainrot Notify",
    "fields": {"Name": "La Grande Combinasion"},
    "numbers": {"money_per_sec": 10_000_000, "players": 3, "players_max": 8},
}


@pytest.mark.parametrize(
    ("query", "matches"),
    [
        ("where=money_per_sec>=10M", True),
        ("where=money_per_sec>10M", False),
        ("where=money_per_sec<=10000000", True),
        ("where=money_per_sec<1B", True),
        ("where=money_per_sec=10M", True),
        ("where=money_per_sec!=10M", False),
        ("where=players<players_max", True),
        ("where=name~grande", True),
        ("where=name=la grande combinasion", True),
        ("where=name!=la grande combinasion", False),
        ("where=title~brainrot", True),
        ("where=missing>=1", False),
        ("channels=111,222", True),
        ("channels=222", False),
        ("where=money_per_sec>=10M&where=players<players_max&channels=111", True),
    ],
)
def test_matching(query: str, matches: bool) -> None:
    assert parse_filter_query(query).matches(JOB) is matches


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("where=", "where=''"),
        ("where=money>>1", "money>>1"),
        ("where=money>many things", "many things"),
        ("foo=1", "'foo'"),
        ("tier=gold", "'gold'"),
        ("channels=a b", "channels='a b'"),
    ],
)
def test_bad_filters_name_the_bad_part(query: str, named: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter_query(query)
    assert named in str(caught.value)


def test_equal_filters_share_one_canonical_form() -> None:
    one = parse_filter_query("where=b>1&where=a~x&channels=2,1")
    two = parse_filter_query("channels=1,2&where=a~x&where=b>1&where=b>1")
    assert one.canonical() == two.canonical()
    assert one.digest() == two.digest()


def test_tiers_add_their_clauses() -> None:
    tiers = parse_tiers({"10m+": "where=money_per_sec>=10000000"})
    # "+" is a space in a query string: clients send it as %2B.
    rich = parse_filter_query("tier=10m%2B&where=players<players_max", tiers)
    assert rich.matches(JOB)
    poor = dict(JOB, numbers={"money_per_sec": 5, "players": 1, "players_max": 8})
    assert not rich.matches(poor)


def test_a_bad_tier_is_refused_with_its_name() -> None:
    with pytest.raises(FilterError, match="Tier 'x'"):
        parse_tiers({"x": "where=nonsense"})
