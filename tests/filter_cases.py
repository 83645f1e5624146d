"""Jobs in every value format, and filters with the jobs each must match.

Shared by the filter tests of both interfaces (``GET /job/next`` and ``/ws``),
so that every operator and every value format is checked the same on each.
"""

from __future__ import annotations

from typing import Any

# Published in this order; the index is the job's name in CASES.
JOBS: list[dict[str, Any]] = [
    {
        "title": "Brainrot Notify",
        "fields": {
            "💰 Money per sec": "$10M/s",
            "👥 Players": "3/8",
            "Name": "La Grande Combinasion",
        },
    },
    {
        "fields": {
            "Money per sec": "10.5m/s",
            "Players": "8/8",
            "Name": "Tralalero Tralala",
        }
    },
    {
        "fields": {
            "Money per sec": "1.2B",
            "Players": "1/4",
            "Name": "Grande Nonna",
        }
    },
    {"fields": {"Money per sec": "750K", "Players": "full", "Name": "Small"}},
    {"fields": {"Money per sec": "soon", "Name": "Unknown"}},
]

# What the gateway reads from each job's fields (not-numbers left out).
NUMBERS: list[dict[str, int]] = [
    {"money_per_sec": 10_000_000, "players": 3, "players_max": 8},
    {"money_per_sec": 10_500_000, "players": 8, "players_max": 8},
    {"money_per_sec": 1_200_000_000, "players": 1, "players_max": 4},
    {"money_per_sec": 750_000},
    {},
]

# (query string, indexes of JOBS it matches, oldest first)
CASES: list[tuple[str, list[int]]] = [
    ("where=money_per_sec>=10M", [0, 1, 2]),
    ("where=money_per_sec>10M", [1, 2]),
    ("where=money_per_sec<=750K", [3]),
    ("where=money_per_sec<10.5M", [0, 3]),
    ("where=money_per_sec=1.2B", [2]),
    ("where=money_per_sec=10000000", [0]),
    # A job without the key (the fourth's money is text) never matches.
    ("where=money_per_sec!=10M", [1, 2, 3]),
    # Servers that are not full.
    ("where=players<players_max", [0, 2]),
    ("where=players_max=8", [0, 1]),
    ("where=name~GRANDE", [0, 2]),
    ("where=name=small", [3]),
    ("where=name!=small", [0, 1, 2, 4]),
    ("where=title~brainrot", [0]),
    # Every clause must hold: at least 10M/s, and not full.
    ("where=money_per_sec>=10M&where=players<players_max", [0, 2]),
    ("where=money_per_sec>1T", []),
]
CASE_IDS = [query for query, _ in CASES]

# TIERS as an operator would set it, and what each tier matches of JOBS.
TIERS = {
    "10m+": "where=money_per_sec>=10M",
    "open-10m+": "where=money_per_sec>=10M&where=players<players_max",
}
TIER_CASES: list[tuple[str, list[int]]] = [
    ("tier=10m%2B", [0, 1, 2]),
    ("tier=open-10m%2B", [0, 2]),
    # A tier narrowed further by the request's own clauses.
    ("tier=10m%2B&where=name~tralalero", [1]),
]

# Bad filters, and a word the error must name.
BAD_FILTERS: list[tuple[str, str]] = [
    ("where=money_per_sec", "money_per_sec"),
    ("where=money_per_sec>=lots!", "lots!"),
    ("where=Money>=1", "Money"),
    ("where=a>=", "a>="),
    ("channels=a%20b", "channels"),
    ("tier=nope", "nope"),
]
