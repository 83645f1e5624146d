"""daphne under cProfile, switched on and off by signals (``bench.handshakes``).

    python daphne_profiled.py OUT [daphne arguments]

SIGUSR2 starts profiling the serving thread; SIGUSR1 stops it and writes the
statistics to OUT. Standalone, so that it runs from any checkout.
"""

from __future__ import annotations

import cProfile
import signal
import sys
from typing import Any

profile = cProfile.Profile()


def _start(*_: Any) -> None:
    profile.enable()


def _stop(*_: Any) -> None:
    profile.disable()
    profile.dump_stats(OUT)


if __name__ == "__main__":
    OUT = sys.argv[1]
    signal.signal(signal.SIGUSR2, _start)
    signal.signal(signal.SIGUSR1, _stop)
    sys.argv = ["daphne", *sys.argv[2:]]
    from daphne.cli import CommandLineInterface

    CommandLineInterface.entrypoint()
