"""``bench.handshakes``: a profile's time added up by where it was spent."""

from __future__ import annotations

import cProfile
import json
import pstats

import pytest

from bench.handshakes import places


def test_every_second_of_a_profile_is_placed_once() -> None:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(2000):
        json.loads(json.dumps({"type": "hello", "last_id": None}))
    profile.disable()
    stats = pstats.Stats(profile)
    placed = places(stats)
    assert sum(share for _, _, share in placed) == pytest.approx(1.0)
    where = {place for place, _, _ in placed}
    assert "Python's standard library" in where  # json's own Python code
    assert len(where) == len(placed)
