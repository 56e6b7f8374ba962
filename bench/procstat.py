"""CPU time and memory of processes, read from /proc (Linux only)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

__all__ = [
    "Meter",
    "cpu_seconds",
    "machine_busy_seconds",
    "postgres_cpu_seconds",
    "postgres_pids",
    "rss_mb",
]

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, *, with_reaped_children: bool = False) -> float:
    """utime + stime of a live process (0 when gone); optionally plus its reaped children's."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the command name: state=0, ppid=1, ..., utime=11, stime=12, cutime=13, cstime=14.
    ticks = int(fields[11]) + int(fields[12])
    if with_reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # Fields 8.. (guest time) are already counted in user/nice.
    return (sum(fields[:8]) - idle) / _TICKS


def postgres_pids(postmaster: int) -> list[int]:
    """The postmaster's live children (backends, walwriter, checkpointer, ...)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == postmaster:
            children.append(int(entry.name))
    return children


def postgres_cpu_seconds(postmaster: int) -> float:
    """All CPU the server used so far: postmaster, live children, and exited children
    (their time moves into the postmaster's cutime/cstime when it reaps them)."""
    total = cpu_seconds(postmaster, with_reaped_children=True)
    return total + sum(cpu_seconds(pid) for pid in postgres_pids(postmaster))


def rss_mb(pid: int) -> float | None:
    """Resident set size (VmRSS) in MiB, None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Meter:
    """CPU seconds of some processes between start() and stop() (with this process's
    own as "loadgen": the load generator runs here), and their max RSS meanwhile."""

    def __init__(self, pids: dict[str, int], postmaster: int | None = None) -> None:
        self.pids = pids
        self.postmaster = postmaster
        self.max_rss: dict[str, float] = {}
        self._sampler: asyncio.Task[None] | None = None

    def _cpu(self) -> dict[str, float]:
        out = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        if self.postmaster is not None:
            out["postgres"] = postgres_cpu_seconds(self.postmaster)
        out["loadgen"] = time.process_time()
        out["machine"] = machine_busy_seconds()
        return out

    async def _sample(self) -> None:
        while True:
            for name, pid in self.pids.items():
                mb = rss_mb(pid)
                if mb is not None:
                    self.max_rss[name] = max(self.max_rss.get(name, 0.0), mb)
            await asyncio.sleep(0.25)

    def start(self) -> None:
        self._before = self._cpu()
        self._sampler = asyncio.create_task(self._sample())

    async def stop(self) -> dict[str, Any]:
        after = self._cpu()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        cpu = {k: round(after[k] - self._before[k], 2) for k in after}
        machine = cpu.pop("machine")
        # Whatever else ran on the machine meanwhile (a test suite...): noise in the figures.
        others = round(max(0.0, machine - sum(cpu.values())), 2)
        return {
            "cpu_s": cpu,
            "other_processes_cpu_s": others,
            "max_rss_mb": {k: round(v, 1) for k, v in self.max_rss.items()},
        }
