"""`python -m bench.kill_cost`: what a lock holder's size costs its successor when it is
killed, whatever the takeover protocol.

The bare handoff of bench/handoff.py (three candidates: lock, bump, NOTIFY), SIGKILL
of the holder -> the successor's NOTIFY seen by a LISTEN client, ROUNDS (30) rounds for
each footprint (interleaved): idle sessions held besides the lock's (SESSIONS: 0, 2, 6) and resident
size (RSS_MB: the candidate's own, 60, 120). On SIGKILL the kernel frees the process's
memory before it closes a socket; then the backend of every session exits at once, on
the same cores as the successor's. An embedded PostgreSQL of its own; each footprint's
candidates have their own lock and channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.handoff import BareHandoff
from bench.harness import env_int, progress, run_main
from bench.stats import summary
from pgleader.embedded import EmbeddedPostgres

__all__ = ["main"]


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
    }


def main() -> int:
    return run_main(run, "kill_cost")


if __name__ == "__main__":
    sys.exit(main())
