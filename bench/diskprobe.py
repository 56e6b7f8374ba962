"""How long the disk under the benchmark's PostgreSQL takes to flush, while a step runs.

Every commit the gateway answers on waits for PostgreSQL to flush its WAL (that is
what makes a stored signal survive a crash), so when the disk stalls, every answer
in flight waits with it. `FlushProbe` writes one 8 KiB block to a file on the same
file system every `every` seconds and times the `fdatasync`, in a thread of the
benchmark process: a step's answer tail next to the disk's flush times says which
is which. Its own load is small (400 KiB/s at the default 20 ms).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from bench.stats import summary

__all__ = ["FlushProbe"]


class FlushProbe:
    def __init__(self, directory: Path, every: float = 0.02) -> None:
        self.path = directory / "flush-probe"
        self.every = every
        self._samples_ms: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._samples_ms = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="flush-probe", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """The flush times (ms) of the run, and how many took 25 ms or longer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)
        samples = self._samples_ms
        return {
            **summary(samples),
            "at_least_25ms": sum(1 for s in samples if s >= 25),
            "total_s": round(sum(samples) / 1000, 2),
        }

    def _run(self) -> None:
        block = os.urandom(8192)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while not self._stop.wait(self.every):
                os.pwrite(fd, block, 0)
                started = time.perf_counter()
                os.fdatasync(fd)
                self._samples_ms.append((time.perf_counter() - started) * 1000)
        finally:
            os.close(fd)
