"""Loaded into the gateway's processes by ``bench.garbage`` (``PYTHONPATH``) only.

With ``GARBAGE_REPORT`` set, SIGUSR2 runs a full garbage collection that keeps
what it finds unreachable, and writes how many objects of each type it found
to that file as JSON (through a temporary file, so the reader never sees half
of it). Found objects are then freed, so that the next report counts only
what came after this one.

With ``GC_PAUSES_DIR`` set, a daphne process writes each garbage collection
(generation, seconds) and each time its event loop ran a 10 ms timer more than
20 ms late (a stall) to ``pauses-<pid>.jsonl`` there, at most once a second;
``python -m bench.gc_pauses`` sums them up.
"""

import os
import sys

if os.environ.get("GARBAGE_REPORT"):
    import collections
    import gc
    import json
    import signal

    def _report(signum, frame):
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found = collections.Counter(
                f"{type(obj).__module__}.{type(obj).__qualname__}" for obj in gc.garbage
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.collect()  # kept, they were still cycles: free them now
        path = os.environ["GARBAGE_REPORT"]
        with open(f"{path}.tmp", "w") as report:
            json.dump(found, report)
        os.replace(f"{path}.tmp", path)

    signal.signal(signal.SIGUSR2, _report)

if os.environ.get("GC_PAUSES_DIR") and any("daphne" in a for a in sys.orig_argv):
    import asyncio
    import gc
    import json
    import threading
    import time

    _TICK, _STALL = 0.01, 0.02
    _events: list[list[object]] = []
    _lock = threading.Lock()
    _started = [0.0]

    def _on_gc(phase, info):
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        paused = time.perf_counter() - _started[0]
        with _lock:
            _events.append(["gc", time.time(), info["generation"], paused])

    def _watch(loop, due):
        late = time.perf_counter() - due
        if late > _STALL:
            with _lock:
                _events.append(["stall", time.time(), late])
        loop.call_later(_TICK, _watch, loop, time.perf_counter() + _TICK)

    _run_forever = asyncio.BaseEventLoop.run_forever

    def run_forever(self):
        self.call_later(_TICK, _watch, self, time.perf_counter() + _TICK)
        return _run_forever(self)

    def _write():
        directory = os.environ["GC_PAUSES_DIR"]
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"pauses-{os.getpid()}.jsonl")
        while True:
            time.sleep(1.0)
            with _lock:
                batch = _events[:]
                _events.clear()
            if not batch:
                continue
            with open(path, "a") as log:
                log.writelines(json.dumps(event) + "\n" for event in batch)

    gc.callbacks.append(_on_gc)
    # Every loop the process runs (Twisted's asyncio reactor runs one) is timed.
    asyncio.BaseEventLoop.run_forever = run_forever  # type: ignore[method-assign]
    threading.Thread(target=_write, name="gc-pauses", daemon=True).start()
