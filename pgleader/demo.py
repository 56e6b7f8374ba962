"""`pgleader demo`: three elector processes, SIGKILL the leader, measure the takeover.

With no DSN it starts a throwaway embedded PostgreSQL, so it runs on a fresh
machine with nothing configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pgleader.embedded import EmbeddedPostgres
from pgleader.migrations import migrate

__all__ = ["ElectorProcess", "Timeline", "run_demo"]


class Timeline:
    """Every JSON line of every child, in arrival order, with the monotonic time it arrived."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self._grew = asyncio.Event()

    def add(self, line: dict[str, Any]) -> None:
        self.lines.append((time.monotonic(), line))
        self._grew.set()

    async def wait(
        self, timeout: float = 30, since: int = 0, **match: Any
    ) -> tuple[int, float, dict[str, Any]]:
        """The first line at index >= since whose fields equal `match`: (index, at, line)."""
        start = since
        async with asyncio.timeout(timeout):
            while True:
                for i in range(start, len(self.lines)):
                    at, line = self.lines[i]
                    if all(line.get(k) == v for k, v in match.items()):
                        return i, at, line
                start = len(self.lines)
                self._grew.clear()
                await self._grew.wait()


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

    async def start(self, lines: Timeline) -> None:
        self.proc = await asyncio.create_subprocess_exec(*self.args, stdout=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read(lines))

    async def _read(self, lines: Timeline) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                lines.add(json.loads(raw))

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


async def run_demo(dsn: str | None, rounds: int = 3) -> int:
    tmp = None
    server = None
    if dsn is None:
        tmp = tempfile.mkdtemp(prefix="pgleader-demo-")
        os.chmod(tmp, 0o755)
        server = EmbeddedPostgres(Path(tmp) / "pg")
        dsn = server.start()
        print(f"started a throwaway PostgreSQL on 127.0.0.1:{server.port}", flush=True)
    lines = Timeline()
    procs = {f"demo-{n}": ElectorProcess(dsn, "demo", f"demo-{n}") for n in (1, 2, 3)}
    t0 = time.monotonic()
    takeovers: list[float] = []

    def say(text: str) -> None:
        print(f"{time.monotonic() - t0:8.3f}s  {text}", flush=True)

    try:
        await migrate(dsn)
        for p in procs.values():
            await p.start(lines)
        seen, _, line = await lines.wait(event="elected")
        leader = line["instance"]
        say(f"{leader} elected, epoch {line['epoch']}")
        for _ in range(rounds):
            killed_at = time.monotonic()
            procs[leader].signal(signal.SIGKILL)
            say(f"SIGKILL {leader}")
            seen, at, line = await lines.wait(since=seen + 1, event="elected")
            takeovers.append(at - killed_at)
            say(f"{line['instance']} elected, epoch {line['epoch']} "
                f"(takeover {1000 * (at - killed_at):.1f} ms)")  # fmt: skip
            await procs[leader].stop()
            mark = len(lines.lines)
            await procs[leader].start(lines)
            await lines.wait(since=mark, event="started", instance=leader)
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
