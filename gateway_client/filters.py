"""``JobFilter``: which jobs a client asks for, as the gateway's query parameters.

The gateway reads the filter language (docs/filters.md) and is its only judge:
whether ``10%`` is a number, or ``gold`` a configured tier, is its answer
(``400 bad_filter`` naming the bad part). This side checks only the shape
that the language documents, so that a typo fails at once, before any request,
with the clause named, rather than as a refused WebSocket handshake that does
not say why.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# <key><op><value>: a lowercase snake_case key, an operator, a value.
_CLAUSE_RE = re.compile(r"[a-z0-9_]{1,64}(>=|<=|!=|>|<|=|~)(?=.*\S).+", re.S)

# The gateway allows at most this many ``where=`` clauses in one request.
MAX_CLAUSES = 20

Params = list[tuple[str, str]]


@dataclass(frozen=True)
class JobFilter:
    """``where=`` clauses, ``channels=`` and ``tier=``; every part must hold.

    Build one with ``JobFilter.of``, which accepts what a caller naturally has
    (a list or a single clause, a list or ``"A,B"``) and raises ``ValueError``
    naming the first malformed clause. An empty filter asks for every job.
    """

    where: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    tier: str | None = None

    @classmethod
    def of(
        cls,
        where: Sequence[str] | str | None = None,
        channels: Sequence[str] | str | None = None,
        tier: str | None = None,
    ) -> JobFilter:
        """A checked filter from the arguments of ``next_job`` or ``stream``."""
        clauses = tuple(_clauses(where))
        if len(clauses) > MAX_CLAUSES:
            raise ValueError(f"at most {MAX_CLAUSES} where clauses, not {len(clauses)}")
        names = tuple(_channels(channels))
        if tier is not None:
            if not isinstance(tier, str) or not tier.strip():
                raise ValueError(f"tier must be a tier's name, not {tier!r}")
            tier = tier.strip()
        return cls(clauses, names, tier)

    def __bool__(self) -> bool:
        return bool(self.where or self.channels or self.tier is not None)

    def params(self) -> Params:
        """The query parameters, unencoded: httpx and ``urlencode`` encode them."""
        params: Params = [("where", clause) for clause in self.where]
        if self.channels:
            params.append(("channels", ",".join(self.channels)))
        if self.tier is not None:
            params.append(("tier", self.tier))
        return params

    def __str__(self) -> str:
        return "&".join(f"{name}={value}" for name, value in self.params()) or "all"


# The filter that asks for every job.
NO_FILTER = JobFilter()


def _clauses(where: Sequence[str] | str | None) -> Iterable[str]:
    # One string is one clause: "1,250" and "name~a, b" hold commas.
    items = [where] if isinstance(where, str) else list(where or ())
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"a where clause must be a string, not {item!r}")
        clause = item.strip()
        if not _CLAUSE_RE.fullmatch(clause):
            raise ValueError(
                f"where clause {item!r} must be <key><op><value>, with a "
                "lowercase snake_case key and one of >=, <=, !=, >, <, =, ~"
            )
        yield clause


def _channels(channels: Sequence[str] | str | None) -> Iterable[str]:
    items = channels.split(",") if isinstance(channels, str) else list(channels or ())
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"a channel must be a string id, not {item!r}")
        # The gateway judges the ids; blanks ("A,,B", "A,") are only noise.
        if item.strip():
            yield item.strip()
