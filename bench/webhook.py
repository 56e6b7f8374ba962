"""`python -m bench.webhook`: how many signals/s the gateway takes and executes, at
what answer latency, CPU and memory; against a bare aiohttp server and a plain
psycopg loop.

Three `pgleader serve` instances on an embedded PostgreSQL. An open-loop load
generator (bench/loadgen.py) posts distinct signals (unique position labels,
timestamp now) at fixed rates, either all to the leader or round-robin to the
three (a load balancer). Per step:

    answer latency   scheduled send -> HTTP answer (p50/p95/p99/max), errors, timeouts (3 s)
    execution        received_at -> finished_at of every signal of the step (database clock)
    cost             CPU s per 1000 executed signals: the three instances + every
                     postgres process (utime+stime from /proc, exited backends included)
    memory           max VmRSS of each instance during the step
    batches          the leader's execution batches in the step and their mean size
    disk flush       fdatasync of an 8 KiB block on PostgreSQL's file system every
                     20 ms (bench/diskprobe.py): every answer waits for WAL flushes,
                     so a disk stall shows in the answer tail; this says when it did

Then a bisection over the rate for the highest rate held (round-robin): no
error, answer p99 < 100 ms, >= 95 % of the offered rate answered *and executed*
(the leader keeping up, not only the followers answering 202). Baselines in the same run: bench/bare_server.py under the same load
generator (the web-layer ceiling) and bench/db_ceiling.py (the database-part
ceiling). The load generator runs on the same machine and shares its cores.

Knobs: RATES (100,200,500,1000,2000), DURATION (10 s), TARGETS (leader,round_robin),
SEARCH_DURATION (30 s), SEARCH_STEPS (4 probes), BARE_SEARCH_STEPS (4),
SEARCH_TARGET (round_robin), DB_DURATION (10 s), DB_CONNECTIONS (4), WARMUP (3 s at
200/s round-robin before the first step, not reported),
LOADGEN_CONNECTIONS (500), SETTLE_TIMEOUT (60 s), SKIP_BARE=1, PG_SETTINGS
(name=value,... for the server: to attribute a cost, e.g. synchronous_commit=off).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from bench.db_ceiling import db_ceiling
from bench.diskprobe import FlushProbe
from bench.harness import (
    RESULTS,
    Cluster,
    env_float,
    env_int,
    progress,
    run_main,
    settings_from_env,
    timings_from_env,
    uninterrupted,
    webhook_body,
)
from bench.loadgen import Step, open_loop, session
from bench.procstat import Meter
from pgleader.embedded import free_port

__all__ = ["main"]

_tags = itertools.count(1)

_DB_STATS = """
select count(*),
       count(*) filter (where status = 'executed'),
       count(*) filter (where status in ('pending', 'executing')),
       percentile_disc(array[0.5, 0.95, 0.99]) within group (order by
           extract(epoch from finished_at - received_at) * 1000) filter (where status = 'executed'),
       max(extract(epoch from finished_at - received_at) * 1000) filter (where status = 'executed'),
       extract(epoch from max(finished_at) - min(received_at)),
       count(*) filter (where status not in ('pending', 'executing', 'executed'))
  from gateway.signals
 where received_at >= %s and starts_with(position, %s)
"""


def held(step: dict[str, Any], p99_limit: float = 100.0) -> bool:
    """The search criterion: the rate was taken, fast, without error, and executed."""
    p99 = step["latency_ms"]["p99"]
    return (
        step["errors"] == 0
        and step["timeouts"] == 0
        and step["aborted_at_s"] is None
        and p99 is not None
        and p99 < p99_limit
        and step["achieved_rate"] >= 0.95 * step["rate"]
        and step.get("all_executed", True)
        # Fast 202s from followers while the leader falls behind is not holding the
        # rate: the backlog would grow without bound in a longer run.
        and step.get("executed_rate", step["rate"]) >= 0.95 * step["rate"]
    )


async def find_ceiling(
    probe: Callable[[float], Awaitable[dict[str, Any]]],
    lo: float,
    hi: float | None,
    steps: int,
    *,
    verify_lo: bool,
) -> tuple[float | None, list[dict[str, Any]]]:
    """Bisection between a rate that held (lo) and one that did not (hi; None: keep
    doubling). Returns the highest rate that held under `probe`, and every probe."""
    best: float | None = None
    probes: list[dict[str, Any]] = []
    todo = steps
    if verify_lo and lo > 0 and todo > 0:
        todo -= 1
        result = await probe(lo)
        probes.append(result)
        if held(result):
            best = lo
        else:
            lo, hi = 0.0, lo
    for _ in range(todo):
        if hi is None:
            if lo <= 0:
                break  # nothing held and nothing failed: no bracket to search
            rate = lo * 2
        else:
            if hi - lo <= max(20.0, 0.05 * hi):
                break
            rate = float(round((lo + hi) / 2, -1))
        result = await probe(rate)
        probes.append(result)
        if held(result):
            lo = best = rate
        else:
            hi = rate
    return best, probes


# -- the gateway ------------------------------------------------------------------


async def _settle(
    cluster: Cluster, tag: str, since: datetime, expected: int, timeout: float
) -> tuple[bool, float, tuple[Any, ...]]:
    """Wait until every stored signal of the step left pending/executing and at least
    `expected` are stored (spooled ones arrive late). (settled, seconds waited, stats)."""
    began = time.monotonic()
    while True:
        row = (await cluster.query(_DB_STATS, since, f"{tag}_"))[0]
        if row[2] == 0 and row[0] >= expected:
            return True, time.monotonic() - began, row
        if time.monotonic() - began > timeout:
            return False, time.monotonic() - began, row
        await asyncio.sleep(0.25)


async def gateway_step(
    cluster: Cluster, http: Any, target: str, rate: float, duration: float
) -> dict[str, Any]:
    tag = f"w{next(_tags)}"
    leader, epoch = await cluster.leader()
    if target == "leader":
        urls = [f"{leader.url}/webhook"]
    else:
        urls = [f"{i.url}/webhook" for i in cluster.instances]
    postmaster = cluster.server.postmaster_pid()
    meter = Meter({i.instance_id: i.pid for i in cluster.instances}, postmaster)
    since = await cluster.clock() - timedelta(seconds=1)
    batches_before = await _batches(http, leader.operator_url)
    probe = FlushProbe(cluster.workdir)
    meter.start()
    probe.start()
    step: Step = await open_loop(
        http, urls, rate, duration, lambda i: webhook_body(f"{tag}_{i}", _instrument(i))
    )
    flushes = probe.stop()
    report = step.report()
    expected = sum(n for k, n in step.answers.items() if k[:1] == "2" and "duplicate" not in k)
    timeout = env_float("SETTLE_TIMEOUT", 60.0)
    settled, waited, row = await _settle(cluster, tag, since, expected, timeout)
    usage = await meter.stop()
    batches_after = await _batches(http, leader.operator_url)
    _, epoch_after = await cluster.leader()
    stored, executed, unfinished, pcts, worst, span, other = row
    cpu = usage["cpu_s"]
    server_cpu = sum(v for k, v in cpu.items() if k != "loadgen")
    instances_cpu = server_cpu - cpu.get("postgres", 0.0)
    per_k = (lambda s: round(s / executed * 1000, 3)) if executed else (lambda s: None)
    pcts = pcts or [None, None, None]
    report.update(
        {
            "target": target,
            "leader": leader.instance_id,
            "leadership_changed": epoch_after != epoch,
            "stored": stored,
            "executed": executed,
            "not_executed": {"unfinished": unfinished, "other_status": other},
            "all_executed": settled and executed == stored and stored >= expected,
            "settled_after_load_s": round(waited, 2),
            "executed_rate": round(executed / float(span), 1) if executed and span else 0.0,
            "received_to_executed_ms": {
                "p50": _round(pcts[0]),
                "p95": _round(pcts[1]),
                "p99": _round(pcts[2]),
                "max": _round(worst),
            },
            "cpu_s": cpu,
            "other_processes_cpu_s": usage["other_processes_cpu_s"],
            "cpu_s_per_1000": {
                "total": per_k(server_cpu),
                "instances": per_k(instances_cpu),
                "postgres": per_k(cpu.get("postgres", 0.0)),
                "loadgen": per_k(cpu["loadgen"]),
            },
            "max_rss_mb": usage["max_rss_mb"],
            "leader_batches": _batch_delta(batches_before, batches_after),
            "disk_flush_ms": flushes,
        }
    )
    report["held"] = held(report)
    lat = report["latency_ms"]
    progress(
        f"{target:11} {rate:6.0f}/s: answered {report['achieved_rate']:7.1f}/s, executed"
        f" {report['executed_rate']:7.1f}/s, p50 {lat['p50']} p99 {lat['p99']} max {lat['max']} ms,"
        f" errors {report['errors']}, timeouts {report['timeouts']}, exec p99"
        f" {report['received_to_executed_ms']['p99']} ms, cpu/1000"
        f" {report['cpu_s_per_1000']['total']} s, other processes {usage['other_processes_cpu_s']}"
        f" cpu s, disk flush p99 {flushes['p99']} max {flushes['max']} ms, held={report['held']}"
    )
    return report


async def _batches(http: Any, url: str) -> dict[str, int] | None:
    """The leader's execution batch counters (GET /coordinator/leader)."""
    try:
        _, raw = await http.request("GET", f"{url}/coordinator/leader")
        return dict(json.loads(raw)["metrics"]["execution_batches"])
    except Exception:  # a step must not fail for want of a statistic
        return None


def _batch_delta(
    before: dict[str, int] | None, after: dict[str, int] | None
) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    batches = after["batches"] - before["batches"]
    signals = after["signals"] - before["signals"]
    return {
        "batches": batches,
        "signals": signals,
        "mean_size": round(signals / batches, 2) if batches else None,
        "largest_so_far": after["largest"],
    }


def _round(v: Any) -> float | None:
    return None if v is None else round(float(v), 2)


# -- the bare web layer -----------------------------------------------------------


async def bare_baseline(rates: list[float], duration: float, connections: int) -> dict[str, Any]:
    port = free_port()
    proc = await uninterrupted(asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.bare_server", "--port", str(port),
        stdout=asyncio.subprocess.PIPE,
    ))  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
        if json.loads(line or b"{}").get("event") != "serving":
            raise RuntimeError("bare server did not start")
        url = f"http://127.0.0.1:{port}/webhook"

        async def probe(rate: float) -> dict[str, Any]:
            meter = Meter({"bare": proc.pid})
            meter.start()
            async with session(connections) as http:
                step = await open_loop(http, [url], rate, duration, lambda i: webhook_body(f"b{i}"))
            report = step.report()
            usage = await meter.stop()
            report["cpu_s"] = usage["cpu_s"]
            report["other_processes_cpu_s"] = usage["other_processes_cpu_s"]
            report["max_rss_mb"] = usage["max_rss_mb"]
            report["held"] = held(report)
            lat = report["latency_ms"]
            progress(
                f"bare        {rate:6.0f}/s: answered {report['achieved_rate']:7.1f}/s,"
                f" p50 {lat['p50']} p99 {lat['p99']} ms, errors {report['errors']},"
                f" timeouts {report['timeouts']}, held={report['held']}"
            )
            return report

        steps = [await probe(rate) for rate in rates]
        lo, hi = _bracket(steps)
        best, probes = await find_ceiling(
            probe, lo, hi, env_int("BARE_SEARCH_STEPS", 4), verify_lo=False
        )
        return {
            "what": "aiohttp handler that reads the body and answers 200, one process, no database",
            "steps": steps,
            "search_probes": probes,
            "max_rate_held": best if best is not None else (lo or None),
            "search_duration_s": duration,
        }
    finally:
        if proc.returncode is None:
            proc.terminate()
            await uninterrupted(proc.wait())


def _bracket(steps: list[dict[str, Any]]) -> tuple[float, float | None]:
    """The highest rate that held and the lowest above it that did not."""
    lo = max((s["rate"] for s in steps if s["held"]), default=0.0)
    hi = min((s["rate"] for s in steps if not s["held"] and s["rate"] > lo), default=None)
    return lo, hi


# -- the run ----------------------------------------------------------------------


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for target in result["config"]["targets"]:
        for step in result["steps"]:
            if step["target"] != target:
                continue
            if step["rate"] == 1000:
                ok = (
                    step["errors"] == 0
                    and step["timeouts"] == 0
                    and step["all_executed"]
                    and step["executed"] >= step["sent"]
                    and step["executed_rate"] >= 950
                    and step["achieved_rate"] >= 950
                )
                checks.append(
                    {
                        "target": f">= 1000 signals/s end-to-end, all executed ({target})",
                        "value": {
                            "answered_per_s": step["achieved_rate"],
                            "executed_per_s": step["executed_rate"],
                            "executed": step["executed"],
                            "sent": step["sent"],
                        },
                        "pass": ok,
                    }
                )
            if step["rate"] == 200:
                p99 = step["latency_ms"]["p99"]
                checks.append(
                    {
                        "target": f"p99 answer latency < 25 ms at 200 signals/s ({target})",
                        "value": p99,
                        "pass": p99 is not None and p99 < 25 and step["errors"] == 0,
                    }
                )
    rss = [v for s in result["steps"] for v in s["max_rss_mb"].values()]
    checks.append(
        {
            "target": "memory per instance < 150 MB (max VmRSS over every step)",
            "value": max(rss) if rss else None,
            "pass": bool(rss) and max(rss) < 150,
        }
    )
    return checks


async def run() -> dict[str, Any]:
    rates = [float(r) for r in os.environ.get("RATES", "100,200,500,1000,2000").split(",")]
    duration = env_float("DURATION", 10.0)
    targets = os.environ.get("TARGETS", "leader,round_robin").split(",")
    search_target = os.environ.get("SEARCH_TARGET", "round_robin")
    search_duration = env_float("SEARCH_DURATION", 30.0)
    search_steps = env_int("SEARCH_STEPS", 4)
    connections = env_int("LOADGEN_CONNECTIONS", 500)
    timings = timings_from_env()
    result: dict[str, Any] = {
        "benchmark": "webhook",
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "note": (
                "load generator, 3 instances and PostgreSQL share these CPUs: at high rates"
                " the client's own CPU (cpu_s.loadgen) is taken from the servers; CPU used"
                " meanwhile by anything else on the machine is other_processes_cpu_s per step"
            ),
            "loadavg_at_start": os.getloadavg(),
        },
        "config": {
            "rates": rates,
            "duration_s": duration,
            "targets": targets,
            "search": {
                "target": search_target,
                "duration_s": search_duration,
                "steps": search_steps,
                "criterion": "no error/timeout, answer p99 < 100 ms, >= 95% of the offered rate"
                " answered 2xx and executed (first received -> last finished), every stored"
                " signal executed",
                "note": (
                    f"probes of {search_duration:g} s, shorter than the 30 s of the criterion"
                    if search_duration < 30
                    else "30 s probes; the first re-checks the best fixed step at full length,"
                    " then bisection: the answer is within the last bracket, not exact"
                ),
            },
            "client": f"bench.loadgen.Client (HTTP/1.1 on asyncio streams), keep-alive, up to {connections} connections, timeout 3 s"
            " from the scheduled send",
            "timings_s": {
                "heartbeat": timings.heartbeat,
                "lease": timings.lease,
                "evict_after": timings.evict_after,
            },
        },
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
    }
    steps: list[dict[str, Any]] = []
    settings = settings_from_env()
    if settings:
        result["config"]["postgresql_settings"] = settings
    async with Cluster(3, timings, settings) as cluster, session(connections) as http:
        progress(f"3 instances on PostgreSQL at {cluster.dsn}")
        warmup = env_float("WARMUP", 3.0)
        if warmup > 0:  # pools, plan caches, first batches: not what a step should measure
            urls = [f"{i.url}/webhook" for i in cluster.instances]
            await open_loop(
                http, urls, 200, warmup, lambda i: webhook_body(f"warm_{i}", _instrument(i))
            )
            await asyncio.sleep(1)
        for target in targets:
            for rate in rates:
                steps.append(await gateway_step(cluster, http, target, rate, duration))
                await asyncio.sleep(1)
        result["steps"] = steps

        async def probe(rate: float) -> dict[str, Any]:
            return await gateway_step(cluster, http, search_target, rate, search_duration)

        lo, hi = _bracket([s for s in steps if s["target"] == search_target])
        best, probes = await find_ceiling(probe, lo, hi, search_steps, verify_lo=True)
        result["search"] = {
            "max_rate_held": best,
            "held_in_fixed_steps": lo or None,  # DURATION-long only: the fallback
            "probes": probes,
        }
        progress(f"search: highest rate held ({search_target}, {search_duration:g} s): {best}")

        db_duration = env_float("DB_DURATION", 10.0)
        db = await db_ceiling(
            cluster.dsn,
            db_duration,
            env_int("DB_CONNECTIONS", 4),
            postmaster=cluster.server.postmaster_pid(),
        )
        progress(f"plain psycopg loop: {db['rows_per_s']} rows/s")
    baselines: dict[str, Any] = {"db_loop": db}
    if os.environ.get("SKIP_BARE"):
        baselines["bare_http"] = {"skipped": "SKIP_BARE set"}
    else:
        baselines["bare_http"] = await bare_baseline(rates, duration, connections)
    result["baselines"] = baselines

    ours = best if best is not None else (lo or None)
    bare_best = baselines["bare_http"].get("max_rate_held")
    result["fractions"] = {
        "ours_max_rate_held": ours,
        "of_bare_http_max_rate": round(ours / bare_best, 3) if ours and bare_best else None,
        "of_db_loop_rows_per_s": round(ours / db["rows_per_s"], 3) if ours else None,
        "note": "ours: the search's highest rate held (search target and probe length above;"
        " if no probe held, the best DURATION-long fixed step); bare: the same search over"
        " the bare server with DURATION-long probes; db loop: rows/s of bench/db_ceiling.py",
    }
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["targets"] = _targets(result)
    for check in result["targets"]:
        progress(f"{'PASS' if check['pass'] else 'FAIL'}  {check['target']}: {check['value']}")
    progress(f"fractions: {result['fractions']}")
    try:
        from bench.plots import webhook_plots

        paths = webhook_plots(
            result, RESULTS / "webhook_latency.png", RESULTS / "webhook_throughput.png"
        )
        result["plots"] = [str(p) for p in paths]
    except ImportError as exc:
        result["plots"] = f"not drawn: {exc}"
    return result


def main() -> int:
    return run_main(run, "webhook")


if __name__ == "__main__":
    sys.exit(main())


def _instrument(i: int) -> str:
    """50 instruments in turn: an instrument has one order in flight at a time (target
    positions), so a load on one instrument measures that instrument's round trip,
    not the gateway; traders' strategies spread over instruments."""
    return f"BENCH_{i % 50}"
