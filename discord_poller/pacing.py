"""When to poll a channel next: the interval aimed for, burst mode, and
Discord's rate-limit bucket, which always wins. Django-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from discord_poller.client import BucketState

# How long polling stays at the burst interval after a poll that found jobs:
# notifier bots often post several servers in a row.
DEFAULT_BURST_SECONDS = 3.0


def spread_delay(bucket: BucketState) -> float:
    """Seconds to wait so the bucket's remaining requests spread evenly.

    With ``remaining`` requests left and the window ending in ``reset_in``
    seconds, polling every ``reset_in / (remaining + 1)`` seconds uses the last
    request as the window ends, and the next one opens the new window: the
    bucket's whole allowance, at an even pace, with no 429.
    """
    if bucket.remaining is None or bucket.reset_in is None:
        return 0.0
    return bucket.reset_in / (bucket.remaining + 1)


@dataclass
class Pace:
    """The interval a channel aims for: the burst interval shortly after jobs."""

    interval: float
    burst_interval: float
    burst_seconds: float = DEFAULT_BURST_SECONDS
    burst_until: float = -math.inf

    def found_jobs(self, now: float) -> None:
        """A poll at ``now`` (monotonic seconds) found jobs: start a burst."""
        self.burst_until = now + self.burst_seconds

    def bursting(self, now: float) -> bool:
        return now < self.burst_until

    def current(self, now: float) -> float:
        """The interval between polls to aim for at ``now``."""
        if self.bursting(now):
            return min(self.burst_interval, self.interval)
        return self.interval

    def next_delay(
        self, now: float, poll_started: float, bucket: BucketState, allowed_in: float
    ) -> float:
        """Seconds from ``now`` until the next poll of a poll started then.

        The largest of: what is left of the aimed interval, the even spread of
        the bucket, and what the client says Discord allows (bans, 429s, the
        global limit).
        """
        aimed = poll_started + self.current(now) - now
        return max(aimed, spread_delay(bucket), allowed_in, 0.0)
