"""Turn a Discord message posted by a notifier bot into a clean Roblox job.

Django-free and pure: ``parse_message`` never raises, whatever the input, and
its payload always passes the contract's ``POST /job`` validation.

Where the job id comes from, first match wins:

1. a field named like ``Job ID``/``JobId``/``Server ID``/``Instance ID``; the
   PC or plain field before a ``(Mobile)`` one, then the order of the fields;
2. a join link's ``gameInstanceId=`` (also ``jobId=``/``instanceId=``,
   percent-encoded deep links included);
3. a ``TeleportToPlaceInstance(place, "id", ...)`` join script;
4. a bare GUID.

Steps 2-4 scan each embed's title, description, field values, url, author and
footer in turn, then the message content (and a forwarded message's), then
link buttons. Placeholder values ("None", "Hidden", the all-zero GUID) are no
id. The place id comes from a ``Place ID`` field, else from the link or script
that gave the job id, else from the first link or script that has one.

Field names keep their emoji; only markdown goes. When a name repeats, an
empty value never replaces a value, and a different one is kept as "Name (2)".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

__all__ = ["ParsedJob", "parse_message", "plain_text"]

# Discord's own limits; anything longer is not from Discord, and capping keeps
# every regex below cheap on hostile input.
MAX_TEXT = 6000
MAX_EMBEDS = 10
MAX_FIELDS_PER_EMBED = 25
MAX_TITLE = MAX_NAME = 256
MAX_VALUE = 1024
MAX_DESCRIPTION = MAX_CONTENT = 4096
MAX_FOOTER = MAX_URL = 2048
MAX_BUTTON_URLS = 40
# Discord caps a message's embeds at 6000 characters in all; this leaves room
# for the content, a forwarded copy and link buttons, and bounds the work.
MAX_MESSAGE_TEXT = 32_000
# The server's own caps (contract section 4 and its validator): at most 100
# fields, and the whole body within MAX_JOB_BYTES (16 KiB) however it is encoded.
MAX_FIELDS = 100
FIELDS_JSON_BUDGET = 11 * 1024

JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MESSAGE_ID_RE = JOB_ID_RE
CHANNEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PLACEHOLDERS = frozenset(
    {"none", "null", "nil", "na", "n-a", "unknown", "undefined", "hidden", "private"}
    | {"tba", "tbd", "00000000-0000-0000-0000-000000000000"}
)
_HAS_ALNUM = re.compile(r"[A-Za-z0-9]")

# --- markdown ---------------------------------------------------------------

# Protected spans become one private-use character each, so the emphasis
# rules below can neither see into them nor be broken up by them.
_SENTINEL_BASE = 0xF0000
_SENTINEL_RE = re.compile("[\U000f0000-\U000ffffd]")
_SPECIAL_RE = re.compile(r"[`\\\[<*_~|#>]|://")
_TOKEN_GATE_RE = re.compile("[`\\\\[<\U000f0000-\U000ffffd]|://")
_TOKEN_RE = re.compile(
    # Discord's own fence rule: the language tag needs a newline after it.
    r"```(?:[a-z0-9_+.#-]+?\n)?\n*(?P<fence>[^\n].*?)\n*```"
    r"|(?<!`)(?P<ticks>`++)(?P<code>.*?[^`])(?P=ticks)(?!`)"
    r"|\\(?P<escaped>[^\sA-Za-z0-9])"
    r"|\[(?P<label>[^\[\]\n]{0,256})\]"
    r"\(\s*<?(?P<href>[a-z][a-z0-9+.-]{0,30}://[^\s()<>]+)>?\s*\)"
    r"|<(?P<angled>[a-z][a-z0-9+.-]{0,30}://[^\s<>]+)>"
    r"|(?P<url>\b[a-z][a-z0-9+.-]{0,30}://[^\s<>()\[\]\"'`|]+)"
    r"|<a?:(?P<emoji>\w{1,64}):\d{1,25}>"
    # Input that happens to hold a sentinel character keeps it, protected.
    r"|(?P<private>[\U000f0000-\U000ffffd])",
    re.IGNORECASE | re.DOTALL,
)
_EMPHASIS = (
    ("*", re.compile(r"\*\*(.+?)\*\*(?!\*)", re.DOTALL)),
    ("_", re.compile(r"__(.+?)__(?!_)", re.DOTALL)),
    ("~", re.compile(r"~~(.+?)~~", re.DOTALL)),
    ("|", re.compile(r"\|\|(.+?)\|\|", re.DOTALL)),
    # A lone marker inside the span ends the scan, which keeps these linear.
    ("*", re.compile(r"\*(?=[^\s*])([^*]+?)(?<=\S)\*(?!\*)")),
    ("_", re.compile(r"(?<!\w)_([^_]+?)_(?!\w)")),
)
_STRAY_CODE_RE = re.compile(r"```(?:[a-z0-9_+.#-]+\n)?|`+", re.IGNORECASE)
_LINE_PREFIX_RE = re.compile(r"^[ \t]*(?:#{1,3}|-#|>>>|>)[ \t]+", re.MULTILINE)
_INVISIBLE_RE = re.compile("[\u200b\u2060\ufeff]")
# json.loads joins a valid surrogate pair into one character: any left is half.
_UNSTORABLE_RE = re.compile("[\x00\ud800-\udfff]")
# Whitespace, and the fillers bots use to make a field look empty.
_BLANK = "[\\s\u3164\u2800\u115f\u1160]"
_EDGE_BLANK_RE = re.compile(f"^{_BLANK}+|{_BLANK}+$")
_TRAILING_SPACE_RE = re.compile(r"[ \t\u00a0]+$", re.MULTILINE)


def plain_text(value: str) -> str:
    """Return ``value`` as Discord displays it, without markdown, trimmed.

    Text past Discord's 6000-character message limit is dropped.
    """
    text = _coerce(value)
    if not text:
        return ""
    text = text.replace("\r\n", "\n")
    if _SPECIAL_RE.search(text):
        text = _strip_markdown(text)
    # Bots pad names and values with zero-width spaces, even inside **...**.
    text = _TRAILING_SPACE_RE.sub("", _INVISIBLE_RE.sub("", text))
    return _EDGE_BLANK_RE.sub("", text)


def _strip_markdown(text: str) -> str:
    kept: list[str] = []

    def keep(span: str) -> str:
        kept.append(span)
        return chr(_SENTINEL_BASE + len(kept) - 1)

    def token(match: re.Match[str]) -> str:
        kind = match.lastgroup
        if kind == "fence":
            return keep(match["fence"])
        if kind == "code":
            return keep(match["code"].strip())
        if kind == "escaped":
            return keep(match["escaped"])
        if kind in ("href", "label"):
            label, href = match["label"], match["href"]
            if label.strip() == href:
                return keep(href)
            return f"{_TOKEN_RE.sub(token, label)} ({keep(href)})"
        if kind == "emoji":
            return keep(f":{match['emoji']}:")
        return keep(match[kind or "url"])

    if _TOKEN_GATE_RE.search(text):
        text = _TOKEN_RE.sub(token, text)
    for _ in range(4):  # nesting like **__x__** takes one round per level
        before = text
        for marker, pattern in _EMPHASIS:
            if marker in text:
                text = pattern.sub(r"\1", text)
        if text == before:
            break
    if "`" in text:
        text = _STRAY_CODE_RE.sub("", text)
    if "#" in text or ">" in text:
        text = _LINE_PREFIX_RE.sub("", text)
    if kept:
        text = _SENTINEL_RE.sub(lambda m: kept[ord(m[0]) - _SENTINEL_BASE], text)
    return text


# --- job ids ----------------------------------------------------------------

_DELIMITERS = frozenset(" \t\r\n<>\"'`|()[]{}\\")
_INSTANCE_PARAM_RE = re.compile(
    r"(?<![a-z0-9_])(?:gameinstanceid|jobid|instanceid)=([A-Za-z0-9_-]{1,64})"
    r"(?![A-Za-z0-9_-])",
    re.IGNORECASE,
)
_PLACE_PARAM_RE = re.compile(r"(?<![a-z0-9_])placeid=(\d{1,19})(?!\d)", re.IGNORECASE)
_GAMES_PATH_RE = re.compile(r"/games/(\d{1,19})(?!\d)", re.IGNORECASE)
_SCRIPT_RE = re.compile(
    r"TeleportToPlaceInstance\s*\(\s*([^,()\"'\n]{0,64}?)\s*,\s*"
    r"(?:([\"'])([A-Za-z0-9_-]{1,64})\2|\[\[([A-Za-z0-9_-]{1,64})\]\])",
    re.IGNORECASE,
)
_GUID_RE = re.compile(
    r"(?<![A-Za-z0-9_-])[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    r"(?![A-Za-z0-9_-])",
    re.IGNORECASE,
)
_DIGITS_RE = re.compile(r"\d{1,19}")
_NAME_WORD_RE = re.compile(r"[a-z0-9]+")
_SHORTCODE_RE = re.compile(r"^(?:\s*:\w+:)+")
_PLATFORM_WORDS = frozenset({"pc", "desktop", "computer", "mobile", "phone", "ios"})
_MOBILE_WORDS = frozenset({"mobile", "phone", "ios", "android"})
_JOB_NAMES = frozenset(
    {"jobid", "serverid", "instanceid", "serverinstanceid", "gameinstanceid"}
)
_PLACE_NAMES = frozenset({"placeid", "gameplaceid"})

Found = tuple[str, int | None]


@dataclass(frozen=True)
class ParsedJob:
    """A job found in one Discord message, ready to publish."""

    job_id: str
    place_id: int | None
    title: str | None
    fields: dict[str, str] = field(hash=False)
    message_id: str | None
    channel: str | None

    def as_payload(self) -> dict[str, Any]:
        """Return the ``POST /job`` body; keys whose value is None are left out."""
        payload: dict[str, Any] = {
            "job_id": self.job_id,
            "place_id": self.place_id,
            "channel": self.channel,
            "message_id": self.message_id,
            "title": self.title,
        }
        payload = {key: value for key, value in payload.items() if value is not None}
        payload["fields"] = dict(self.fields)
        payload["source"] = "discord"
        return payload


def parse_message(
    message: Mapping[str, Any], channel: str | None = None
) -> ParsedJob | None:
    """Return the job a Discord message announces, or None when it names none.

    ``channel`` defaults to the message's ``channel_id``.
    """
    if not isinstance(message, Mapping):
        return None
    reading = _Reading()
    reading.read_message(message)
    found = _from_fields(reading.id_values) or _scan(reading.texts)
    if found is None:
        return None
    job_id, place_id = found
    place_id = (
        _place_from_fields(reading.place_values)
        or place_id
        or _any_place(reading.texts)
    )
    if channel is None:
        channel = message.get("channel_id")
    return ParsedJob(
        job_id=job_id,
        place_id=place_id,
        title=reading.title,
        fields=reading.fields,
        message_id=_identifier(message.get("id"), MESSAGE_ID_RE),
        channel=_identifier(channel, CHANNEL_RE),
    )


@dataclass
class _Reading:
    """What one message holds, gathered in scan order."""

    fields: dict[str, str] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)  # raw, for links and scripts
    id_values: list[tuple[bool, str]] = field(default_factory=list)
    place_values: list[str] = field(default_factory=list)
    title: str | None = None
    chars_left: int = MAX_MESSAGE_TEXT
    json_left: int = FIELDS_JSON_BUDGET
    urls_left: int = MAX_BUTTON_URLS

    def read_message(self, message: Mapping[str, Any]) -> None:
        embeds = _mappings(message.get("embeds"))[:MAX_EMBEDS]
        contents = [message.get("content")]
        # A forwarded message carries the original in its snapshots.
        for snapshot in _mappings(message.get("message_snapshots"))[:MAX_EMBEDS]:
            inner = _mapping(snapshot.get("message"))
            embeds += _mappings(inner.get("embeds"))[:MAX_EMBEDS]
            contents.append(inner.get("content"))
        # Read first so no embed can use up their share, scanned after them.
        texts = [self.take(content, MAX_CONTENT, scan=False) for content in contents]
        for embed in embeds[:MAX_EMBEDS]:
            self.read_embed(embed)
        self.texts += [text for text in texts if text]
        self.read_buttons(message.get("components"), depth=3)

    def read_embed(self, embed: Mapping[str, Any]) -> None:
        title = plain_text(self.take(embed.get("title"), MAX_TITLE))[:MAX_TITLE]
        if self.title is None and title:
            self.title = title
        self.take(embed.get("description"), MAX_DESCRIPTION)
        for item in _mappings(embed.get("fields"))[:MAX_FIELDS_PER_EMBED]:
            name = self.take(item.get("name"), MAX_NAME, scan=False)
            value = self.take(item.get("value"), MAX_VALUE)
            name, value = plain_text(name)[:MAX_NAME], plain_text(value)[:MAX_VALUE]
            self.add_field(name, value)
            kind, mobile = _name_kind(name)
            if kind == "job":
                self.id_values.append((mobile, value))
            elif kind == "place":
                self.place_values.append(value)
        self.take(embed.get("url"), MAX_URL)
        author = _mapping(embed.get("author"))
        self.take(author.get("name"), MAX_NAME)
        self.take(author.get("url"), MAX_URL)
        self.take(_mapping(embed.get("footer")).get("text"), MAX_FOOTER)

    def read_buttons(self, components: Any, depth: int) -> None:
        for component in _mappings(components):
            if self.urls_left <= 0:
                return
            if self.take(component.get("url"), MAX_URL):
                self.urls_left -= 1
            if depth > 1:
                self.read_buttons(component.get("components"), depth - 1)

    def take(self, value: Any, limit: int, scan: bool = True) -> str:
        """Raw text cut to Discord's limit for its place and to what is left."""
        text = _coerce(value)
        if not text or self.chars_left <= 0:
            return ""
        text = text[: min(limit, self.chars_left)]
        self.chars_left -= len(text)
        if scan:
            self.texts.append(text)
        return text

    def add_field(self, name: str, value: str) -> None:
        """Add one field; a repeated name never loses a value to a later one.

        An empty value never replaces a value; a different value is kept as
        "Name (2)", "Name (3)"...; the same value again is dropped.
        """
        if not name and not value:
            return  # a spacer field
        key, number = name, 1
        while key in self.fields:
            held = self.fields[key]
            if held == value or not value:
                return
            if not held:
                break  # an empty earlier value gives way
            number += 1
            key = f"{name} ({number})".lstrip()
        cost = len(json.dumps(key)) + len(json.dumps(value)) + 4
        if cost > self.json_left:
            return  # the server would refuse the whole job
        if key not in self.fields and len(self.fields) >= MAX_FIELDS:
            return
        self.json_left -= cost
        self.fields[key] = value


def _name_kind(name: str) -> tuple[str | None, bool]:
    """Whether a field name means the job id or the place id, and if it is mobile."""
    lowered = name.lower()
    if "id" not in lowered:
        return None, False
    words = _NAME_WORD_RE.findall(_SHORTCODE_RE.sub("", lowered))
    if not words or len(words) > 6:
        return None, False
    core = "".join(word for word in words if word not in _PLATFORM_WORDS)
    mobile = any(word in _MOBILE_WORDS for word in words)
    if core in _JOB_NAMES:
        return "job", mobile
    if core in _PLACE_NAMES:
        return "place", mobile
    return None, False


def _from_fields(id_fields: list[tuple[bool, str]]) -> Found | None:
    # sorted() is stable: the PC/plain fields first, each group in field order.
    for _mobile, value in sorted(id_fields, key=lambda item: item[0]):
        if _valid_job_id(value):
            return value, None
        guid = _GUID_RE.search(value)
        if guid and _valid_job_id(guid[0]):
            return guid[0], None
    return None


def _scan(texts: list[str]) -> Found | None:
    for finder in (_from_link, _from_script, _from_guid):
        for text in texts:
            found = finder(text)
            if found is not None:
                return found
    return None


def _from_link(text: str) -> Found | None:
    lowered = text.lower()
    if "%" not in text and "instanceid" not in lowered and "jobid" not in lowered:
        return None
    candidates = [text, unquote(text)] if "%" in text else [text]
    for candidate in candidates:
        for match in _INSTANCE_PARAM_RE.finditer(candidate):
            if not _valid_job_id(match[1]):
                continue
            link = _token(candidate, match.start(), match.end())
            place = _PLACE_PARAM_RE.search(link) or _GAMES_PATH_RE.search(link)
            return match[1], _place_int(place[1]) if place else None
    return None


def _from_script(text: str) -> Found | None:
    for match in _SCRIPT_RE.finditer(text):
        job_id = match[3] or match[4]
        if _valid_job_id(job_id):
            return job_id, _place_int(match[1].strip())
    return None


def _from_guid(text: str) -> Found | None:
    for match in _GUID_RE.finditer(text):
        if _valid_job_id(match[0]):
            return match[0], None
    return None


def _place_from_fields(values: list[str]) -> int | None:
    for value in values:
        place = _place_int(value) or _any_place([value])
        if place is not None:
            return place
    return None


def _any_place(texts: list[str]) -> int | None:
    for text in texts:
        for pattern in (_PLACE_PARAM_RE, _GAMES_PATH_RE, _SCRIPT_RE):
            for match in pattern.finditer(text):
                place = _place_int(match[1].strip())
                if place is not None:
                    return place
    return None


def _token(text: str, start: int, end: int) -> str:
    """The URL-like run of text around ``text[start:end]``."""
    low, high, limit = start, end, len(text)
    while low > 0 and text[low - 1] not in _DELIMITERS and start - low < 2048:
        low -= 1
    while high < limit and text[high] not in _DELIMITERS and high - end < 2048:
        high += 1
    return text[low:high]


def _valid_job_id(value: str) -> bool:
    return (
        JOB_ID_RE.fullmatch(value) is not None
        and _HAS_ALNUM.search(value) is not None
        and value.lower() not in _PLACEHOLDERS
    )


def _place_int(value: str) -> int | None:
    if not _DIGITS_RE.fullmatch(value):
        return None
    number = int(value)
    return number if 0 < number < 2**63 else None


def _identifier(value: Any, pattern: re.Pattern[str]) -> str | None:
    text = _coerce(value)
    if text is None:
        return None
    text = text.strip()
    return text if pattern.fullmatch(text) else None


def _coerce(value: Any) -> str | None:
    """A string for str and int input (capped at Discord's limit), else None.

    NUL and unpaired surrogates, which JSON can carry but no database stores
    (the gateway refuses a job holding them), are dropped.
    """
    if isinstance(value, str):
        return _UNSTORABLE_RE.sub("", value[:MAX_TEXT])
    if isinstance(value, int) and not isinstance(value, bool):
        if not -(10**64) < value < 10**64:
            return None  # str() of a huge int is slow, or refused outright
        return str(value)
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, list | tuple):
        return []
    return [item for item in value[: MAX_FIELDS * 4] if isinstance(item, Mapping)]
