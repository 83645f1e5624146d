"""Jittered exponential backoff, shared by the long-poll loops and the stream."""

from __future__ import annotations

import random as _random
from collections.abc import Callable

# 2**60 seconds is past any sane maximum; capping the exponent avoids overflow.
_MAX_EXPONENT = 60


class Backoff:
    """Delays for consecutive failures: ``initial * 2**n`` up to ``maximum``.

    Each delay is cut by up to half at random, so that many clients dropped at
    once (a gateway restart) do not come back in lock-step. A ``Retry-After``
    from the gateway is a floor: never retry sooner than it asked.
    """

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        *,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.random = random
        self.failures = 0

    def next_delay(self, retry_after: float | None = None) -> float:
        """Count one more failure and return how long to wait before retrying."""
        ceiling = min(
            self.maximum, self.initial * 2.0 ** min(self.failures, _MAX_EXPONENT)
        )
        self.failures += 1
        delay = ceiling * (1.0 - 0.5 * self.random())
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def reset(self) -> None:
        """A success: the next failure starts again from ``initial``."""
        self.failures = 0
