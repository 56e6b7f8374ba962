"""`python -m bench.kill_cost`: what a lock holder's size costs its successor when it is
killed, whatever the takeover protocol.

The bare handoff of bench/handoff.py (three candidates: lock, bump, NOTIFY), SIGKILL
of the holder -> the successor's NOTIFY seen by a LISTEN client, ROUNDS (30) rounds for
each footprint (interleaved): idle sessions held besides the lock's (SESSIONS: 0, 2, 6) and resident
size (RSS_MB: the candidate's own, 60, 120). On SIGKILL the kernel frees the process's
memory before it closes a socket; then the backend of every session exits at once, on
the same cores as the successor's. An embedded PostgreSQL of its own; each footprint's
candidates have their own lock and channel.

Then the kernel's part alone: a bare Python process holding one TCP connection (no
PostgreSQL), grown to CLOSE_RSS_MB (10, 60, 120; 10 is about its own size) with
THREADS (0, 6) idle threads besides at 60 MB: SIGKILL -> its peer reads end-of-file,
ROUNDS rounds each, interleaved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.handoff import BareHandoff
from bench.harness import env_int, progress, run_main
from bench.stats import summary
from pgleader.embedded import EmbeddedPostgres

__all__ = ["main"]


# The process whose death is timed: resident `rss` MiB, `threads` idle threads, one
# TCP connection to the timer.
_HOLDER = """
import socket, sys, threading, time
port, threads, mb = (int(a) for a in sys.argv[1:])
ballast = bytearray(max(0, mb - 10) * 2**20)
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
stop = threading.Event()
for _ in range(threads):
    threading.Thread(target=stop.wait, daemon=True).start()
conn = socket.create_connection(("127.0.0.1", port))
conn.sendall(b"r")
time.sleep(3600)
"""


async def _socket_close_ms(threads: int, rss: int) -> float:
    """SIGKILL a holder process -> its connection's end-of-file read here, ms."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLDER, str(port), str(threads), str(rss)
        )
        try:
            conn, _ = await asyncio.wait_for(loop.sock_accept(server), 30)
            with conn:
                await asyncio.wait_for(loop.sock_recv(conn, 1), 30)  # grown and connected
                await asyncio.sleep(0.1)
                killed_at = time.perf_counter()
                proc.kill()
                while await asyncio.wait_for(loop.sock_recv(conn, 1), 30):
                    pass
                return (time.perf_counter() - killed_at) * 1000
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _socket_close(rounds: int) -> list[dict[str, Any]]:
    grid = [(0, mb) for mb in _ints("CLOSE_RSS_MB", "10,60,120")]
    grid += [(n, 60) for n in _ints("THREADS", "0,6") if n]
    taken: list[list[float]] = [[] for _ in grid]
    for n in range(rounds):
        for i, (threads, rss) in enumerate(grid):
            taken[i].append(await _socket_close_ms(threads, rss))
        progress(f"socket close, round {n + 1}/{rounds}")
    rows = []
    for (threads, rss), samples in zip(grid, taken, strict=True):
        got = summary(samples)
        progress(f"{rss} MB, {threads} threads: kill -> peer's EOF p50 {got['p50']} ms")
        rows.append({"rss_mb": rss, "threads": threads, "socket_closed_ms": got})
    return rows


def _ints(name: str, default: str) -> list[int]:
    return [int(v) for v in os.environ.get(name, default).split(",")]


async def run() -> dict[str, Any]:
    rounds = env_int("ROUNDS", 30)
    grid = [(n, 0) for n in _ints("SESSIONS", "0,2,6")]
    grid += [(0, mb) for mb in _ints("RSS_MB", "60,120") if mb]
    tmp = Path(tempfile.mkdtemp(prefix="pgleader-bench-"))
    os.chmod(tmp, 0o755)  # the postgres user must reach its data dir
    server = EmbeddedPostgres(tmp / "pg")
    dsn = server.start()
    rows = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            sets = [
                await stack.enter_async_context(
                    BareHandoff(dsn, tmp, key=key, sessions=sessions, rss_mb=rss)
                )
                for key, (sessions, rss) in enumerate(grid, start=1)
            ]
            taken: list[list[float]] = [[] for _ in sets]
            for n in range(rounds):  # interleaved: the machine's moods fall on every set
                for i, bare in enumerate(sets):
                    await asyncio.sleep(random.uniform(0.2, 0.6))
                    taken[i].append((await bare.round())["elected_ms"])
                progress(f"round {n + 1}/{rounds}")
        for bare, samples in zip(sets, taken, strict=True):
            got = summary(samples)
            progress(
                f"{bare.sessions} idle sessions, {bare.rss_mb or 'own'} MB:"
                f" kill -> successor's NOTIFY p50 {got['p50']} ms, p99 {got['p99']} ms"
            )
            rows.append({
                "idle_sessions": bare.sessions,
                "rss_mb_asked": bare.rss_mb or None,
                "candidate_rss_mb": bare.candidate_rss_mb,
                "elected_ms": got,
            })  # fmt: skip
    finally:
        server.stop("fast")
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "benchmark": "kill_cost",
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "rounds": rounds,
        "footprints": rows,
        "socket_close": await _socket_close(rounds),
    }


def main() -> int:
    return run_main(run, "kill_cost")


if __name__ == "__main__":
    sys.exit(main())
