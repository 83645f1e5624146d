"""The benchmarks' CPU figure, read from /proc for a real process tree."""

from __future__ import annotations

import subprocess
import sys

from bench.fanout_proc import cpu_seconds

BURN = 0.3  # CPU seconds the child spends

# The parent waits for a line, then runs a child that burns BURN seconds of CPU
# and exits, reaps it, says so, and waits to be told to exit.
PARENT = f"""
import subprocess, sys
sys.stdin.readline()
subprocess.run([sys.executable, "-c", '''
import time
while time.process_time() < {BURN}:
    pass
'''], check=True)
print("reaped", flush=True)
sys.stdin.readline()
"""


def test_a_reaped_childs_cpu_still_counts() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdin is not None and parent.stdout is not None
    try:
        before = cpu_seconds([parent.pid])
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline() == "reaped\n"
        after = cpu_seconds([parent.pid])
    finally:
        parent.stdin.close()
        parent.wait(timeout=10)
    # The child is gone from the tree; its time is the parent's now.
    assert after - before >= BURN - 0.02
