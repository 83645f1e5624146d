"""Channel-layer group names."""

from __future__ import annotations

# Every published job is sent once to this group; each process's fan-out hub
# (jobs.fanout) is its one member there.
ALL_JOBS = "jobs.all"
