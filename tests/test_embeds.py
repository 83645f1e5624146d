"""The Discord embed parser: fixtures per notifier format, markdown, and properties."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from discord_poller.embeds import ParsedJob, parse_message, plain_text

FIXTURES = json.loads(
    (Path(__file__).parent / "fixtures" / "discord_embeds.json").read_text("utf-8")
)
GUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
OTHER = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
PLACE = 109983668079237

# The contract's POST /job rules (section 4) and the server's caps.
JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
CHANNEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ALLOWED_KEYS = {"job_id", "place_id", "channel", "message_id", "title", "fields"}
MAX_JOB_BYTES = 16384


def assert_valid_payload(payload: dict[str, Any]) -> None:
    """Fail unless ``payload`` is a body the gateway accepts."""
    assert set(payload) <= ALLOWED_KEYS | {"source"}
    assert payload["source"] == "discord"
    assert JOB_ID_RE.fullmatch(payload["job_id"])
    assert None not in payload.values()
    place = payload.get("place_id")
    assert place is None or (type(place) is int and 0 < place < 2**63)
    assert "channel" not in payload or CHANNEL_RE.fullmatch(payload["channel"])
    assert "message_id" not in payload or JOB_ID_RE.fullmatch(payload["message_id"])
    assert "title" not in payload or len(payload["title"]) <= 256
    fields = payload["fields"]
    assert len(fields) <= 100
    assert all(type(k) is str and type(v) is str for k, v in fields.items())
    # ensure_ascii is the costliest encoding a client could choose.
    assert len(json.dumps(payload).encode()) <= MAX_JOB_BYTES
    try:
        from jobs.payloads import draft_from_mapping
    except ImportError:
        return
    draft_from_mapping(payload)  # the server's own validator


def message(*embeds: dict[str, Any], content: str = "") -> dict[str, Any]:
    return {"id": "1", "channel_id": "2", "content": content, "embeds": list(embeds)}


def fields_embed(*pairs: tuple[str, str]) -> dict[str, Any]:
    return {"fields": [{"name": n, "value": v, "inline": True} for n, v in pairs]}


# --- one fixture per notifier format ------------------------------------------


@pytest.mark.parametrize("case", FIXTURES, ids=[case["id"] for case in FIXTURES])
def test_fixture(case: dict[str, Any]) -> None:
    job = parse_message(case["message"])
    expected = case["expected"]
    if expected is None:
        assert job is None
        return
    assert job is not None
    assert job.job_id == expected["job_id"]
    assert job.place_id == expected["place_id"]
    assert job.title == expected["title"]
    assert job.fields == expected["fields"]
    assert job.message_id == case["message"]["id"]
    assert job.channel == case["message"]["channel_id"]
    assert_valid_payload(job.as_payload())


def test_payload_keys_and_omitted_nones() -> None:
    job = parse_message({"embeds": [{"description": GUID}]})
    assert job is not None
    assert job.as_payload() == {"job_id": GUID, "fields": {}, "source": "discord"}

    full = parse_message(
        message({"title": "T", "url": f"roblox://placeId=5&gameInstanceId={GUID}"})
    )
    assert full is not None
    assert full.as_payload() == {
        "job_id": GUID,
        "place_id": 5,
        "channel": "2",
        "message_id": "1",
        "title": "T",
        "fields": {},
        "source": "discord",
    }


def test_channel_argument_wins_over_message_channel() -> None:
    job = parse_message(message(content=GUID), channel="999")
    assert job is not None and job.channel == "999"


def test_parsed_job_is_frozen() -> None:
    job = parse_message(message(content=GUID))
    assert isinstance(job, ParsedJob)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.job_id = "x"  # type: ignore[misc]


# --- precedence ---------------------------------------------------------------

LINK = f"https://www.roblox.com/games/start?placeId=1&gameInstanceId={OTHER}"
SCRIPT = f'TeleportToPlaceInstance(2, "{OTHER}")'


@pytest.mark.parametrize(
    ("winner", "loser"),
    [
        (("Job ID", f"`{GUID}`"), ("Link", LINK)),
        (
            ("Link", f"<https://roblox.com/games/start?gameInstanceId={GUID}>"),
            ("Script", SCRIPT),
        ),
        (
            ("Script", f"```lua\nTeleportToPlaceInstance(3, '{GUID}')\n```"),
            ("Note", OTHER),
        ),
    ],
    ids=["field_over_link", "link_over_script", "script_over_guid"],
)
def test_precedence(winner: tuple[str, str], loser: tuple[str, str]) -> None:
    # The loser comes first, so only precedence can pick the winner.
    job = parse_message(message(fields_embed(loser, winner)))
    assert job is not None and job.job_id == GUID


def test_mobile_field_used_when_pc_field_is_empty() -> None:
    job = parse_message(
        message(fields_embed(("Job ID (PC)", "\u200b"), ("Job ID (Mobile)", GUID)))
    )
    assert job is not None and job.job_id == GUID


def test_placeholder_field_value_falls_through_to_description() -> None:
    embed = {"description": f"id {GUID}", **fields_embed(("Job ID", "**None**"))}
    job = parse_message(message(embed))
    assert job is not None and job.job_id == GUID


def test_place_id_field_wins_over_link_place() -> None:
    embed = fields_embed(("Place ID", "42"), ("Link", LINK))
    job = parse_message(message(embed))
    assert job is not None and (job.job_id, job.place_id) == (OTHER, 42)


def test_script_with_place_variable_has_no_place() -> None:
    job = parse_message(
        message(content=f'TeleportToPlaceInstance(game.PlaceId, "{GUID}")')
    )
    assert job is not None and (job.job_id, job.place_id) == (GUID, None)


@pytest.mark.parametrize(
    "value", ["-", "__", "00000000-0000-0000-0000-000000000000", "x" * 65, "a b"]
)
def test_field_values_that_are_no_job_id(value: str) -> None:
    assert parse_message(message(fields_embed(("Job ID", f"`{value}`")))) is None


# --- fields -------------------------------------------------------------------


def test_repeated_field_names_keep_every_value() -> None:
    job = parse_message(
        message(
            fields_embed(("Players", "3/8"), ("Name", "")),
            fields_embed(("Players", ""), ("Players", "3/8"), ("Name", "Tralalero")),
            fields_embed(("Players", "4/8"), ("Job ID", GUID)),
        )
    )
    assert job is not None
    assert job.fields == {
        "Players": "3/8",
        "Name": "Tralalero",
        "Players (2)": "4/8",
        "Job ID": GUID,
    }


def test_spacer_fields_are_dropped() -> None:
    embed = fields_embed(("\u200b", "\u200b"), ("**\u200b**", " "), ("Job ID", GUID))
    job = parse_message(message(embed))
    assert job is not None and job.fields == {"Job ID": GUID}


def test_oversized_message_still_gives_a_valid_payload() -> None:
    embed = {
        "title": "\U0001f600" * 1000,
        "fields": [
            {"name": f"\U0001f4b0{i}" * 100, "value": "\u00e9" * 5000}
            for i in range(30)
        ],
    }
    job = parse_message({"id": "1", "content": GUID, "embeds": [embed] * 12})
    assert job is not None
    assert job.title is not None and len(job.title) == 256
    assert job.fields  # as many as the budget allows, not none at all
    assert all(len(value) <= 1024 for value in job.fields.values())
    assert_valid_payload(job.as_payload())


def test_text_no_database_can_store_is_dropped_not_the_job() -> None:
    # JSON may carry a NUL or half of a surrogate pair; the gateway refuses a
    # job holding either (PostgreSQL cannot store them), so the parser drops
    # the characters and keeps the job.
    job = parse_message(
        message(
            {
                "title": "Brain\x00rot \ud83d",
                "fields": [
                    {"name": "Job ID", "value": f"`{GUID}`\x00"},
                    {"name": "Na\x00me", "value": "Tung\udc00 Sahur \U0001f600"},
                ],
            }
        )
    )
    assert job is not None
    assert job.job_id == GUID
    assert job.title == "Brainrot"
    assert job.fields["Name"] == "Tung Sahur \U0001f600"
    assert_valid_payload(job.as_payload())


def test_pathological_input_stays_fast() -> None:
    texts = ["`" * 3 + "a" * 3000, "**a " * 1500, "\\" * 6000, "`x" * 3000, "%" * 6000]
    start = time.perf_counter()
    for text in texts:
        embed = {"description": text, "fields": [{"name": text, "value": text}] * 25}
        parse_message({"content": text, "embeds": [embed] * 10})
    # Linear work takes tens of milliseconds here; backtracking would take minutes.
    assert time.perf_counter() - start < 2.0


# --- plain_text ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "plain"),
    [
        ("**bold**", "bold"),
        ("*italic*", "italic"),
        ("_italic_", "italic"),
        ("__underline__", "underline"),
        ("~~struck~~", "struck"),
        ("||spoiler||", "spoiler"),
        ("***both***", "both"),
        ("**__~~all~~__**", "all"),
        ("`inline`", "inline"),
        ("``has ` tick``", "has ` tick"),
        ("```lua\nprint('hi')\n```", "print('hi')"),
        ("```\nplain fence\n```", "plain fence"),
        ("```one line```", "one line"),
        (f"```{GUID}\n```", GUID),
        ("**`code in bold`**", "code in bold"),
        ("`**not bold**`", "**not bold**"),
        ("\\*escaped\\*", "*escaped*"),
        ("snake_case_name", "snake_case_name"),
        ("2 * 3 * 4", "2 * 3 * 4"),
        ("[Join](https://x.test/a_b_)", "Join (https://x.test/a_b_)"),
        ("<https://x.test/_a_>", "https://x.test/_a_"),
        ("https://x.test/__init__", "https://x.test/__init__"),
        ("<:cash:1234567890> $10M/s", ":cash: $10M/s"),
        ("# Big\n> quoted\n-# small", "Big\nquoted\nsmall"),
        ("  \u200b padded \u200b \n", "padded"),
        ("line  \nnext", "line\nnext"),
        ("\u3164", ""),
        ("```lua\nunclosed", "unclosed"),
        ("$10M/s", "$10M/s"),
    ],
)
def test_plain_text(raw: str, plain: str) -> None:
    assert plain_text(raw) == plain


def test_plain_text_of_non_strings_is_empty_or_the_number() -> None:
    assert plain_text(None) == ""  # type: ignore[arg-type]
    assert plain_text(42) == "42"  # type: ignore[arg-type]
    assert plain_text(10**5000) == ""  # type: ignore[arg-type]


# --- properties ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
# Markdown characters and id-like pieces, so the parser's branches are reached.
markdownish = st.text(
    alphabet=st.sampled_from(list("`*_~|\\[]()<>:#-=/ \n\u200baA0f")),
    max_size=80,
) | st.sampled_from(
    [GUID, f"`{GUID}`", LINK, SCRIPT, "Job ID", "Job ID (Mobile)", "Place ID", "None"]
)
anything = json_values | markdownish
embed_like = st.fixed_dictionaries(
    {},
    optional={
        "title": anything,
        "description": anything,
        "url": anything,
        "fields": st.lists(
            st.fixed_dictionaries({}, optional={"name": anything, "value": anything})
            | anything,
            max_size=6,
        )
        | anything,
        "footer": st.fixed_dictionaries({}, optional={"text": anything}) | anything,
        "author": anything,
    },
)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "id": anything,
        "channel_id": anything,
        "content": anything,
        "embeds": st.lists(embed_like | anything, max_size=3) | anything,
        "components": anything,
        "message_snapshots": anything,
    },
)


@given(json_values)
def test_any_json_value_never_raises(value: Any) -> None:
    job = parse_message(value)
    if job is not None:
        assert_valid_payload(job.as_payload())


@given(message_like)
@settings(max_examples=150)
def test_any_message_gives_none_or_a_valid_payload(value: dict[str, Any]) -> None:
    job = parse_message(value)
    if job is not None:
        assert_valid_payload(job.as_payload())


@given(st.text() | markdownish)
def test_plain_text_never_raises_and_is_trimmed(text: str) -> None:
    result = plain_text(text)
    assert result == result.strip()
    assert "\u200b" not in result


# Zero-width marks plain_text drops anywhere; edge fillers are left out below.
INVISIBLE = "\u200b\u2060\ufeff"


@given(
    st.text(
        alphabet=st.characters(
            exclude_characters="`*_~|\\[<#>:\u3164\u2800\u115f\u1160"
        )
    )
)
@example("\ud800")
def test_text_without_markdown_keeps_every_visible_character(text: str) -> None:
    # Only whitespace (trailing, edges, CRLF as LF), zero-width marks, NUL and
    # unpaired surrogates (no database stores them) go.
    def visible(value: str) -> str:
        return "".join(
            c
            for c in value
            if not c.isspace()
            and c not in INVISIBLE
            and c != "\x00"
            and not "\ud800" <= c <= "\udfff"
        )

    result = plain_text(text)
    assert visible(result) == visible(text)
    assert result.strip() == result


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ", min_size=1).filter(
        str.strip
    ),
    st.sampled_from(
        ["**{}**", "*{}*", "__{}__", "~~{}~~", "||{}||", "`{}`", "```\n{}\n```"]
    ),
)
def test_markdown_wrapping_is_removed(word: str, form: str) -> None:
    assert plain_text(form.format(word.strip())) == word.strip()


Format = Callable[[str, int], dict[str, Any]]
FORMATS: dict[str, tuple[Format, bool]] = {
    # name: (builder, whether the format carries the place id)
    "field": (lambda g, p: message(fields_embed(("Job ID", f"`{g}`"))), False),
    "emoji_field_fence": (
        lambda g, p: message(fields_embed(("🆔 JobId (PC)", f"```lua\n{g}\n```"))),
        False,
    ),
    "server_id_field": (lambda g, p: message(fields_embed(("Server ID", g))), False),
    "mobile_field_only": (
        lambda g, p: message(fields_embed(("Job ID (Mobile)", f"**`{g}`**"))),
        False,
    ),
    "link": (
        lambda g, p: message(
            {
                "description": f"https://www.roblox.com/games/start?placeId={p}&gameInstanceId={g}"
            }
        ),
        True,
    ),
    "link_games_path": (
        lambda g, p: message(
            fields_embed(
                ("Join", f"[Join](https://roblox.com/games/{p}/x?gameInstanceId={g})")
            )
        ),
        True,
    ),
    "deep_link": (
        lambda g, p: message(content=f"roblox://placeId={p}&gameInstanceId={g}"),
        True,
    ),
    "experiences_link": (
        lambda g, p: message(
            {"url": f"roblox://experiences/start?gameInstanceId={g}&placeId={p}"}
        ),
        True,
    ),
    "script": (
        lambda g, p: message(
            fields_embed(
                (
                    "Join Script",
                    '```lua\ngame:GetService("TeleportService"):'
                    f'TeleportToPlaceInstance({p}, "{g}", game.Players.LocalPlayer)'
                    "\n```",
                )
            )
        ),
        True,
    ),
    "script_single_quotes": (
        lambda g, p: message(
            content=f"TeleportService:TeleportToPlaceInstance({p}, '{g}', player)"
        ),
        True,
    ),
    "bare_guid": (lambda g, p: message({"description": f"**Server:** {g}!"}), False),
}


@given(
    st.uuids().map(str),
    st.booleans(),
    st.integers(min_value=1, max_value=2**63 - 1),
    st.sampled_from(sorted(FORMATS)),
    st.lists(
        st.tuples(
            st.text("abc XYZ*_~`", max_size=20), st.text("abc XYZ*_~`", max_size=20)
        ),
        max_size=3,
    ),
)
def test_any_guid_in_any_format_is_recovered(
    guid: str, upper: bool, place: int, name: str, noise: list[tuple[str, str]]
) -> None:
    guid = guid.upper() if upper else guid
    build, carries_place = FORMATS[name]
    built = build(guid, place)
    built["embeds"].insert(0, fields_embed(*noise))
    job = parse_message(built)
    assert job is not None
    assert job.job_id == guid
    assert job.place_id == (place if carries_place else None)
    assert_valid_payload(job.as_payload())
