"""`pgleader demo`: three elector processes, SIGKILL the leader, measure the takeover.

With no DSN it starts a throwaway embedded PostgreSQL, so it runs on a fresh
machine with nothing configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pgleader.embedded import EmbeddedPostgres
from pgleader.migrations import migrate

__all__ = ["ElectorProcess", "run_demo"]


class ElectorProcess:
    """A `pgleader elect` child process whose JSON lines land in a shared queue."""

    def __init__(self, dsn: str, election: str, instance_id: str, *extra: str) -> None:
        self.args = [
            sys.executable, "-m", "pgleader", "elect", "--dsn", dsn,
            "--election", election, "--instance-id", instance_id, *extra,
        ]  # fmt: skip
        self.instance_id = instance_id
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, lines: asyncio.Queue[tuple[float, dict[str, Any]]]) -> None:
        self.proc = await asyncio.create_subprocess_exec(*self.args, stdout=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read(lines))

    async def _read(self, lines: asyncio.Queue[tuple[float, dict[str, Any]]]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                lines.put_nowait((time.monotonic(), json.loads(raw)))

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


async def _next_event(
    lines: asyncio.Queue[tuple[float, dict[str, Any]]], event: str, timeout: float
) -> tuple[float, dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while True:
            at, line = await lines.get()
            if line.get("event") == event:
                return at, line


async def run_demo(dsn: str | None, rounds: int = 3) -> int:
    tmp = None
    server = None
    if dsn is None:
        tmp = tempfile.mkdtemp(prefix="pgleader-demo-")
        Path(tmp).chmod(0o755)
        server = EmbeddedPostgres(Path(tmp) / "pg")
        dsn = server.start()
        print(f"started a throwaway PostgreSQL on 127.0.0.1:{server.port}", flush=True)
    lines: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
    procs = {f"demo-{n}": ElectorProcess(dsn, "demo", f"demo-{n}") for n in (1, 2, 3)}
    t0 = time.monotonic()
    takeovers: list[float] = []

    def say(text: str) -> None:
        print(f"{time.monotonic() - t0:8.3f}s  {text}", flush=True)

    try:
        await migrate(dsn)
        for p in procs.values():
            await p.start(lines)
        _, line = await _next_event(lines, "elected", 30)
        leader = line["instance"]
        say(f"{leader} elected, epoch {line['epoch']}")
        for _ in range(rounds):
            killed_at = time.monotonic()
            procs[leader].signal(signal.SIGKILL)
            say(f"SIGKILL {leader}")
            at, line = await _next_event(lines, "elected", 30)
            takeovers.append(at - killed_at)
            say(f"{line['instance']} elected, epoch {line['epoch']} "
                f"(takeover {1000 * (at - killed_at):.1f} ms)")  # fmt: skip
            await procs[leader].stop()
            await procs[leader].start(lines)
            await _next_event(lines, "started", 30)
            say(f"{leader} restarted as a follower")
            leader = line["instance"]
        ms = sorted(1000 * t for t in takeovers)
        print(json.dumps({"takeover_ms": [round(m, 1) for m in ms], "max_ms": round(ms[-1], 1)}))
        return 0
    finally:
        for p in procs.values():
            await p.stop()
        if server is not None:
            server.stop("immediate")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
