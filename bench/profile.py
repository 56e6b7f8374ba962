"""`python -m bench.profile`: where a signal's CPU goes, in the leader and in PostgreSQL.

Three instances, pg_stat_statements loaded in the embedded server, a steady
open-loop load (RATE, default 200/s, for DURATION, default 20 s) to TARGET
(leader or round_robin), while py-spy (if installed: `.venv/bin/pip install
py-spy`; not a project dependency) samples the leader. Writes
bench/results/profile.json (top Python functions by own and total time, top
statements by total execution time) and profile_leader.collapsed (the sampled
stacks, for a flame graph). Profiling perturbs what it measures: read shares,
not latencies.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import (
    RESULTS,
    Cluster,
    env_float,
    env_int,
    progress,
    run_main,
    timings_from_env,
    webhook_body,
)
from bench.loadgen import open_loop, session
from bench.procstat import Meter

__all__ = ["main"]

_TOP_STATEMENTS = """
select calls, round(total_exec_time::numeric, 1), round(mean_exec_time::numeric, 3), rows,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 160)
  from pg_stat_statements
 order by total_exec_time desc
 limit %s
"""


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _top_frames(collapsed: str, n: int) -> dict[str, Any]:
    """Own and total share of the busy samples per function, from py-spy's collapsed
    stacks. A sample whose leaf is the event loop's select() is the loop waiting for
    work: counted apart as idle, not in the shares."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = idle = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        k = int(count)
        frames = stack.split(";")
        if frames[-1].startswith(("EpollSelector.select", "_PollLikeSelector.select")):
            idle += k
            continue
        samples += k
        own[frames[-1]] += k
        for frame in set(frames):
            total[frame] += k
    if not samples:
        return {"own": [], "total": []}
    return {
        "idle_share_of_all_samples_pct": round(100 * idle / (idle + samples), 1),
        "own": [(f, round(100 * c / samples, 1)) for f, c in own.most_common(n)],
        "total": [(f, round(100 * c / samples, 1)) for f, c in total.most_common(n)],
    }


async def _record(py_spy: str, pid: int, seconds: float, out: Path) -> None:
    # One sampler, non-blocking, 100 Hz: profiling must not become the bottleneck it measures.
    proc = await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
        "--nonblocking", "--format", "raw", "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await proc.wait()


async def run() -> dict[str, Any]:
    rate = env_float("RATE", 200.0)
    duration = env_float("DURATION", 20.0)
    target = os.environ.get("TARGET", "leader")
    settings = {"shared_preload_libraries": "pg_stat_statements"}
    result: dict[str, Any] = {"benchmark": "profile", "rate": rate, "duration_s": duration}
    async with Cluster(3, timings_from_env(), settings) as cluster, session(200) as http:
        await cluster.query("create extension if not exists pg_stat_statements")
        leader, _ = await cluster.leader()
        # PROFILE_INSTANCE=follower samples a follower instead (what receiving alone costs).
        sampled = leader
        if os.environ.get("PROFILE_INSTANCE") == "follower":
            sampled = next(i for i in cluster.instances if i is not leader)
        urls = [f"{leader.url}/webhook"]
        if target != "leader":
            urls = [f"{i.url}/webhook" for i in cluster.instances]
        # Warm up (pools, caches, plans), then reset the statistics.
        await open_loop(http, urls, rate, 2, lambda i: webhook_body(f"warm_{i}"))
        await asyncio.sleep(1)
        await cluster.query("select pg_stat_statements_reset()")
        py_spy = _py_spy()
        raw = RESULTS / "profile_leader.collapsed"
        recorder = None
        if py_spy:
            RESULTS.mkdir(exist_ok=True)
            recorder = asyncio.create_task(_record(py_spy, sampled.pid, duration, raw))
        meter = Meter(
            {i.instance_id: i.pid for i in cluster.instances}, cluster.server.postmaster_pid()
        )
        meter.start()
        step = await open_loop(http, urls, rate, duration, lambda i: webhook_body(f"p_{i}"))
        await asyncio.sleep(2)  # let the leader finish what it accepted
        usage = await meter.stop()
        if recorder is not None:
            await recorder
        rows = await cluster.query(_TOP_STATEMENTS, env_int("TOP", 15))
        executed = await cluster.scalar(
            "select count(*) from gateway.signals where status = 'executed'"
            " and starts_with(position, 'p_')"
        )
        result["target"] = target
        result["leader"] = leader.instance_id
        result["sampled"] = sampled.instance_id
        result["answers"] = step.report()
        result["executed"] = executed
        result["cpu_s"] = usage["cpu_s"]
        result["cpu_ms_per_signal"] = {
            k: round(v / executed * 1000, 3) for k, v in usage["cpu_s"].items() if executed
        }
        result["other_processes_cpu_s"] = usage["other_processes_cpu_s"]
        calls = await cluster.scalar(
            "select sum(calls) from pg_stat_statements where query not like '%%pg_stat_statements%%'"
        )
        # Each statement is one round trip (no pipelining): the leader's main cost.
        result["statements_per_executed_signal"] = (
            round(float(calls) / executed, 2) if executed else None
        )
        result["statements_by_total_time"] = [
            {"calls": c, "total_ms": float(t), "mean_ms": float(m), "rows": r, "query": q}
            for c, t, m, r, q in rows
        ]
        if py_spy:
            result["python_leader"] = _top_frames(raw.read_text(), env_int("TOP", 15))
            result["collapsed_stacks"] = f"{raw} (flamegraph.pl or speedscope.app read it)"
        else:
            result["python_leader"] = "py-spy not installed: .venv/bin/pip install py-spy"
    progress(f"cpu ms per executed signal: {result['cpu_ms_per_signal']}")
    return result


def main() -> int:
    return run_main(run, "profile")


if __name__ == "__main__":
    sys.exit(main())
