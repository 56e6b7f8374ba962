"""`python -m bench.failover`: how long the gateway is without a leader, and how long
a signal waits, when the leader crashes, shuts down, hangs or is cut off from the
database. Redis TTL locks as the baseline.

Three `pgleader serve` instances on an embedded PostgreSQL, default election
timings (heartbeat 1 s, lease 3 s, evict_after 6 s; PGLEADER_HEARTBEAT etc.
override). Per round: wait until one instance leads and the others wait on the
lock, then at a random phase against the heartbeats

    crash     SIGKILL the leader
    graceful  SIGTERM the leader (it drains, resigns, NOTIFYs)
    hung      SIGSTOP the leader (it is evicted after evict_after; SIGCONT after)
    partition blackhole the leader's TCP proxy to PostgreSQL, sockets left open
              (bench/proxy.py; a second cluster whose instances each go through
              their own proxy); heal after

and at that instant post a signal to a follower. Measured:

    elected   kill -> the new leader's `elected` NOTIFY seen by an independent
              LISTEN client (monotonic clock of this process)
    executed  kill -> the signal's finished_at, both on the database clock
              (clock_timestamp() read right before the kill)

The killed instance is restarted (or SIGCONTed, or healed) and must wait on the
lock again before the next round. Beside every crash round, on the same server, a
round of the bare handoff (bench/handoff.py: lock, bump, NOTIFY in three statements,
nothing else): the goal is a crash takeover no slower (p50 ratio <= 1.0, p99 ratio
<= 1.25, 50 rounds at least). And a round of the same handoff by candidates with the
killed leader's footprint (its resident size, measured before the first round, and
round by round the sessions it held on the server when it was killed): what killing a
process that size costs, whatever it runs. Knobs: ROUNDS_CRASH (50), ROUNDS_GRACEFUL (20),
ROUNDS_HUNG (5), ROUNDS_PARTITION (5), ROUNDS_REDIS (3), REDIS_URL
(redis://127.0.0.1:6379/0; no Redis there: the baseline is skipped, said so in the JSON),
PG_SETTINGS (server settings to profile with, e.g. log_min_duration_statement=0 and
BENCH_KEEP=1 to keep the server's log; never for reported figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from datetime import datetime
from typing import Any

import aiohttp

from bench.handoff import BareHandoff, rss_mb
from bench.harness import (
    RESULTS,
    Cluster,
    Instance,
    env_int,
    progress,
    run_main,
    settings_from_env,
    timings_from_env,
    until,
    webhook_body,
)
from bench.redis_lock import CONFIGS, LockConfig, available, measure
from bench.stats import summary

__all__ = ["main"]

SCENARIOS = {"crash": signal.SIGKILL, "graceful": signal.SIGTERM, "hung": signal.SIGSTOP}


async def _post(http: aiohttp.ClientSession, inst: Instance, body: bytes) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{inst.url}/webhook", data=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def _finished(
    cluster: Cluster, signal_id: int, timeout: float
) -> tuple[str, datetime | None]:
    """Wait until the signal left pending/executing: (status, finished_at)."""
    async with asyncio.timeout(timeout):
        while True:
            rows = await cluster.query(
                "select status, finished_at from gateway.signals where id = %s", signal_id
            )
            if rows and rows[0][0] not in ("pending", "executing"):
                return rows[0][0], rows[0][1]
            await asyncio.sleep(0.01)


async def _logged_at(inst: Instance, event: str, after: float, timeout: float) -> float | None:
    """Wall-clock time of the first `event` in the instance's JSON log after `after`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                for raw in inst.log_path.read_text().splitlines():
                    with contextlib.suppress(ValueError, KeyError):
                        line = json.loads(raw)
                        at = datetime.fromisoformat(line["timestamp"]).timestamp()
                        if line.get("event") == event and at >= after:
                            return at
                await asyncio.sleep(0.1)
    return None


async def footprint(cluster: Cluster, inst: Instance) -> tuple[int, float]:
    """The sessions an instance holds on the server (pool, LISTEN, election) and its
    resident size, MiB."""
    sessions = await cluster.scalar(
        "select count(*) from pg_stat_activity where application_name like %s",
        f"%:{inst.instance_id}",
    )
    return int(sessions), rss_mb(inst.pid)


async def one_round(
    cluster: Cluster, http: aiohttp.ClientSession, scenario: str, n: int
) -> dict[str, Any]:
    t = cluster.timings
    leader = await cluster.steady()
    _, epoch = await cluster.leader()
    followers = [i for i in cluster.instances if i is not leader]
    target = followers[n % len(followers)]
    sessions, rss = await footprint(cluster, leader)
    # Random phase against the heartbeat and the followers' lock-wait slices.
    await asyncio.sleep(random.uniform(0.1, 0.1 + t.heartbeat))
    mark = len(cluster.events.lines)
    body = webhook_body(f"{scenario}_{n}_{os.getpid()}")
    killed_db = await cluster.clock()
    killed_wall = time.time()
    killed_at = time.monotonic()
    if scenario == "partition":
        cluster.proxies[leader.instance_id].blackhole()
    else:
        leader.send(SCENARIOS[scenario])
    post = asyncio.create_task(_post(http, target, body))

    wait = t.evict_after * 3 + 10
    _, elected_at, ev = await cluster.events.wait(timeout=wait, since=mark, event="elected")
    row: dict[str, Any] = {
        "round": n,
        "old_leader": leader.instance_id,
        "new_leader": ev["leader"],
        "epoch": [epoch, ev["epoch"]],
        "elected_ms": (elected_at - killed_at) * 1000,
        "elected_db_ms": (datetime.fromisoformat(ev["at"]) - killed_db).total_seconds() * 1000,
        "leader_sessions": sessions,
        "leader_rss_mb": round(rss, 1),
    }
    claimed = await cluster.scalar(
        "select acquired_at from pgleader.leadership_history where election = 'gateway'"
        " and epoch = %s",
        ev["epoch"],
    )
    if claimed is not None:  # the claim started, the lock granted (its clock_timestamp())
        row["claim_started_db_ms"] = (claimed - killed_db).total_seconds() * 1000
    for kind in ("resigned", "evicted", "lost"):
        for at, line in cluster.events.lines[mark:]:
            if line.get("event") == kind and line.get("epoch") == epoch:
                row[f"{kind}_ms"] = (at - killed_at) * 1000
                break
    status, answer = await post
    row["answer"] = [status, answer.get("status")]
    if "signal_id" in answer:
        final, finished_at = await _finished(cluster, int(answer["signal_id"]), wait)
        row["signal"] = final
        if final == "executed" and finished_at is not None:
            row["executed_ms"] = (finished_at - killed_db).total_seconds() * 1000

    if scenario == "partition":
        # The cut-off leader stops acting when its lease runs out: `lease` after it
        # *sent* its last successful beat (or the epoch bump, when it was cut off before
        # its first beat), which is no later than the database stamped them: its
        # registry row (it cannot reach the server to overwrite it) and its history row.
        last_beat = await cluster.scalar(
            "select greatest(i.last_heartbeat, h.acquired_at)"
            " from pgleader.instances i join pgleader.leadership_history h"
            " on h.election = i.election and h.instance_id = i.instance_id"
            " where i.election = 'gateway' and i.instance_id = %s and h.epoch = %s",
            leader.instance_id,
            epoch,
        )
        lease_end_ms = (last_beat - killed_db).total_seconds() * 1000 + t.lease * 1000
        row["lease_end_db_ms"] = lease_end_ms
        row["margin_ms"] = row["elected_db_ms"] - lease_end_ms
        # When it *says* so (log, transition callbacks) is another matter.
        demoted = await _logged_at(leader, "leadership lost", killed_wall, t.lease * 6)
        if demoted is not None:
            row["demotion_logged_ms"] = (demoted - killed_wall) * 1000

    # Back to three instances, the old leader a follower again.
    if scenario == "partition":
        cluster.proxies[leader.instance_id].heal()
    elif scenario == "hung":
        leader.send(signal.SIGCONT)
    else:
        await leader.wait_exit(60)
        await leader.start()
    await until(lambda: cluster.following(leader), timeout=60)
    return row


async def _rounds(
    cluster: Cluster,
    http: aiohttp.ClientSession,
    scenario: str,
    count: int,
    bare: tuple[BareHandoff, ...] = (),
    matched: BareHandoff | None = None,
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """`count` rounds of `scenario`, each followed by a round of every handoff in `bare`
    on the same server (side by side: the same minutes, the same load). The holder of
    `matched` holds, when killed, as many sessions as that round's killed leader."""
    rows: list[dict[str, Any]] = []
    bare_rows: dict[str, list[dict[str, Any]]] = {b.prefix: [] for b in bare}
    for n in range(count):
        row = await one_round(cluster, http, scenario, n)
        rows.append(row)
        progress(
            f"{scenario:9} {n + 1:2}/{count}: elected {row['elected_ms']:8.1f} ms,"
            f" executed {row.get('executed_ms', float('nan')):8.1f} ms"
            f" ({row['old_leader']} -> {row['new_leader']})"
        )
        for handoff in bare:
            await asyncio.sleep(random.uniform(0.1, 0.1 + cluster.timings.heartbeat))
            got = bare_rows[handoff.prefix]
            got.append(await handoff.round(row["leader_sessions"] if handoff is matched else None))
            progress(
                f"{handoff.prefix:9} {n + 1:2}/{count}: elected {got[-1]['elected_ms']:8.1f} ms"
            )
    return rows, bare_rows


def _beside_bare(
    crash: list[dict[str, Any]],
    bare: list[dict[str, Any]],
    heavy: list[dict[str, Any]],
    heavy_set: BareHandoff,
    least: list[dict[str, Any]],
) -> dict[str, Any]:
    """pgleader's crash takeover against the bare handoff measured beside it, and
    against the same handoff by candidates of the killed leader's footprint."""
    ours = summary([r["elected_ms"] for r in crash])
    theirs = summary([r["elected_ms"] for r in bare])
    sized = summary([r["elected_ms"] for r in heavy])
    out: dict[str, Any] = {
        "note": "bench/handoff.py: three bare candidates (lock, bump, NOTIFY) on the same"
        " server; a bare round after each crash round; both timed kill -> NOTIFY seen by a"
        " LISTEN client of this process",
        "rounds": [len(crash), len(bare)],
        "crash_elected_ms": ours,
        "bare_elected_ms": theirs,
        "bare_samples_ms": [round(r["elected_ms"], 2) for r in bare],
        "killed_leader_footprint": {
            "sessions": summary([r["leader_sessions"] for r in crash]),
            "rss_mb": summary([r["leader_rss_mb"] for r in crash]),
        },
        "footprint_handoff": {
            "note": "the bare handoff by candidates grown to rss_mb before waiting, whose"
            " holder holds, when it is killed, as many sessions as the killed leader of the"
            " crash round before (its lock's and idle ones, each having read the catalogs"
            " once): not a goal, what killing a process of the leader's size costs here",
            "sessions": summary([r["sessions"] for r in heavy]),
            "rss_mb": heavy_set.rss_mb,
            "candidate_rss_mb": heavy_set.candidate_rss_mb,
            "elected_ms": sized,
            "samples_ms": [round(r["elected_ms"], 2) for r in heavy],
        },
    }
    out["phases_db_clock_ms"] = {
        "note": "database clock from the kill (clock_timestamp() read just before it), p50"
        " of each: 'granted' is when the lock was granted (bare sets), 'taken' when the"
        " claim started (pgleader) or the UPDATE ran (bare), 'notified' when the NOTIFY was"
        " queued; 'seen' is the client's elected_ms, on this process's clock",
        "crash": _phases(crash, "claim_started_db_ms", "elected_db_ms"),
        "bare": _phases(bare, "bumped_db_ms", "notified_db_ms"),
        "footprint": _phases(heavy, "bumped_db_ms", "notified_db_ms"),
        "least_gateway": _phases(least, "bumped_db_ms", "notified_db_ms"),
    }
    out["footprint_handoff"].update(_granted(heavy, theirs))
    if least:
        out["least_gateway_handoff"] = {
            "note": "the bare handoff by candidates of the leader's resident size holding"
            " the fewest sessions a gateway can run with (its lock's, a LISTEN and one pool"
            " session)",
            "elected_ms": summary([r["elected_ms"] for r in least]),
            **_granted(least, theirs),
        }
    for stat in ("p50", "p99"):
        a, b = ours.get(stat), sized.get(stat)
        out["footprint_handoff"][f"crash_{stat}_ratio"] = (
            round(float(a) / float(b), 3) if a and b else None
        )
    for stat, limit in (("p50", 1.0), ("p99", 1.25)):
        a, b = ours.get(stat), theirs.get(stat)
        ratio = round(float(a) / float(b), 3) if a and b else None
        out[f"{stat}_ratio"] = ratio
        out[f"{stat}_goal"] = {
            "target": f"crash elected {stat} / bare handoff {stat} <= {limit:g}",
            "pass": ratio is not None and ratio <= limit and min(len(crash), len(bare)) >= 50,
        }
    return out


def _granted(rows: list[dict[str, Any]], bare: dict[str, Any]) -> dict[str, Any]:
    """When a set's lock was granted to the successor (database clock, from the kill),
    and its p50 over the bare handoff's whole p50. Above 1, that footprint alone frees
    the lock later than the bare handoff has ended: no protocol run after the grant,
    in one statement or none, can catch up."""
    granted = summary([r["granted_db_ms"] for r in rows if "granted_db_ms" in r])
    a, b = granted.get("p50"), bare.get("p50")
    ratio = round(float(a) / float(b), 3) if a and b else None
    return {"granted_db_ms": granted, "granted_p50_over_bare_elected_p50": ratio}


def _phases(rows: list[dict[str, Any]], taken: str, notified: str) -> dict[str, Any]:
    def p50(values: list[float]) -> Any:
        return summary(values)["p50"]

    both = [r for r in rows if taken in r and notified in r]
    return {
        "granted": p50([r["granted_db_ms"] for r in both if "granted_db_ms" in r]),
        "taken": p50([r[taken] for r in both]),
        "notified": p50([r[notified] for r in both]),
        "seen": p50([r["elected_ms"] for r in both]),
        "taken_to_notified": p50([r[notified] - r[taken] for r in both]),
        "notified_to_seen": p50([r["elected_ms"] - r[notified] for r in both]),
    }


def _targets(scenarios: dict[str, dict[str, Any]], hung_bound_ms: float) -> list[dict[str, Any]]:
    checks = [
        ("crash", "elected_ms", "p99", 100.0),
        ("crash", "executed_ms", "p99", 250.0),
        ("graceful", "elected_ms", "p99", 50.0),
        ("hung", "elected_ms", "max", hung_bound_ms),
        ("partition", "elected_ms", "max", hung_bound_ms),
    ]
    out = []
    for scenario, metric, stat, limit in checks:
        if not scenarios.get(scenario, {}).get("rounds"):
            continue
        value = scenarios[scenario][metric][stat]
        out.append(
            {
                "target": f"{scenario} {metric.removesuffix('_ms')} {stat} < {limit:g} ms",
                "value_ms": value,
                "pass": value is not None and value < limit,
            }
        )
    if scenarios.get("partition", {}).get("rounds"):
        value = scenarios["partition"]["margin_ms"]["min"]
        out.append(
            {
                "target": "partition: successor elected only after the old lease ran out"
                " (margin min > 0 ms)",
                "value_ms": value,
                "pass": value is not None and value > 0,
            }
        )
    return out


async def _redis_baseline(rounds: int) -> dict[str, Any]:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    why = available(url)
    if why is not None:
        return {"skipped": f"no Redis at {url} ({why}): baseline not measured"}
    progress(f"redis baseline: {rounds} rounds per configuration, both configurations in parallel")

    async def one(config: LockConfig) -> list[float] | str:
        # A failing baseline must not cost the results measured before it.
        try:
            return await measure(url, config, rounds)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    # Both configurations at once: their failover is dominated by the TTL, not the CPU.
    # A TaskGroup, not gather: on Ctrl-C it waits for every measure() to clean up.
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(c)) for c in CONFIGS]
    samples = [t.result() for t in tasks]
    out: dict[str, Any] = {
        "url": url,
        "note": (
            f"{rounds} rounds each by default (ROUNDS_REDIS): a round of the 30 s design costs"
            " up to ~35 s. The holder is SIGKILLed at a random phase of its renew interval;"
            " measured: kill -> another candidate's SET NX succeeded (its own monotonic clock)."
        ),
    }
    for config, values in zip(CONFIGS, samples, strict=True):
        if isinstance(values, str):
            out[config.name] = {"design": config.what, "failed": values}
            continue
        out[config.name] = {
            "design": config.what,
            "lease_s": config.lease,
            "renew_s": config.renew,
            "retry_s": config.retry,
            "takeover_ms": summary([v * 1000 for v in values]),
            "samples_ms": [round(v * 1000, 1) for v in values],
        }
    return out


async def run() -> dict[str, Any]:
    timings = timings_from_env()
    loadavg_at_start = os.getloadavg()
    rounds = {
        "crash": env_int("ROUNDS_CRASH", 50),
        "graceful": env_int("ROUNDS_GRACEFUL", 20),
        "hung": env_int("ROUNDS_HUNG", 5),
    }
    partition_rounds = env_int("ROUNDS_PARTITION", 5)
    rows: dict[str, list[dict[str, Any]]] = {}
    bare_rows: dict[str, list[dict[str, Any]]] = {}
    heavy: BareHandoff | None = None
    least: BareHandoff | None = None
    # A fresh connection per post, like a webhook sender: no keep-alive connection
    # to a leader that is shutting down.
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        async with Cluster(3, timings, settings_from_env()) as cluster:
            progress(f"3 instances on PostgreSQL at {cluster.dsn}; rounds {rounds}")
            sessions, rss = await footprint(cluster, await cluster.steady())
            progress(f"the leader holds {sessions} sessions and {rss:.0f} MiB")
            heavy = BareHandoff(
                cluster.dsn, cluster.workdir, key=2, sessions=sessions - 1, rss_mb=round(rss)
            )
            least = BareHandoff(cluster.dsn, cluster.workdir, key=3, sessions=2, rss_mb=round(rss))
            async with BareHandoff(cluster.dsn, cluster.workdir) as bare, heavy, least:
                for scenario, count in rounds.items():
                    beside = (bare, heavy, least) if scenario == "crash" else ()
                    rows[scenario], beside_rows = await _rounds(
                        cluster, http, scenario, count, beside, heavy
                    )
                    for prefix, more in beside_rows.items():
                        bare_rows.setdefault(prefix, []).extend(more)
        if partition_rounds:
            # Its own cluster: the proxies (Python, in this process) would slow every
            # other scenario's database traffic by a hop.
            async with Cluster(3, timings, settings_from_env(), proxied=True) as cluster:
                progress(f"partition: 3 instances, each behind its own proxy to {cluster.dsn}")
                rows["partition"], _ = await _rounds(cluster, http, "partition", partition_rounds)
    scenarios: dict[str, dict[str, Any]] = {}
    for scenario, got in rows.items():
        scenarios[scenario] = {
            "action": SCENARIOS[scenario].name
            if scenario in SCENARIOS
            else "blackhole the leader's proxy to PostgreSQL (sockets stay open)",
            "rounds": len(got),
            "elected_ms": summary([r["elected_ms"] for r in got]),
            "elected_db_clock_ms": summary([r["elected_db_ms"] for r in got]),
            "executed_ms": summary([r["executed_ms"] for r in got if "executed_ms" in r]),
            "signals_not_executed": sum(1 for r in got if r.get("signal") != "executed"),
            "rounds_detail": [
                {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in got
            ],
        }
        if scenario == "graceful":
            scenarios[scenario]["resigned_to_elected_ms"] = summary(
                [r["elected_ms"] - r["resigned_ms"] for r in got if "resigned_ms" in r]
            )
        if scenario in ("hung", "partition"):
            scenarios[scenario]["evicted_ms"] = summary(
                [r["evicted_ms"] for r in got if "evicted_ms" in r]
            )
        if scenario == "partition":
            for key in ("lease_end_db_ms", "margin_ms", "demotion_logged_ms"):
                scenarios[scenario][key] = summary([r[key] for r in got if key in r])
            scenarios[scenario]["note"] = (
                "lease_end_db: latest moment the cut-off leader could still act (its last"
                " beat as stamped by the database + lease); margin = elected_db - lease_end_db,"
                " > 0: the successor was elected after the old leader stopped acting (fencing"
                " refuses the old epoch's claims regardless). demotion_logged: when the old"
                " leader logged 'leadership lost' and told its transition subscribers"
            )

    hung_bound = (timings.evict_after + timings.heartbeat) * 1000
    redis = await _redis_baseline(env_int("ROUNDS_REDIS", 3))
    result: dict[str, Any] = {
        "benchmark": "failover",
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            # Other work on the machine (a test suite) shows here and widens the tails.
            "loadavg_at_start": loadavg_at_start,
            "loadavg_at_end": os.getloadavg(),
        },
        "timings_s": {
            "heartbeat": timings.heartbeat,
            "lease": timings.lease,
            "evict_after": timings.evict_after,
        },
        "method": __doc__.split("\n\n", 2)[2].strip() if __doc__ else "",
        "percentiles": "nearest rank: with 20 rounds p95 is the 19th and p99 the 20th sample",
        "scenarios": scenarios,
        "redis_baseline": redis,
        "targets": _targets(scenarios, hung_bound),
    }
    if rows.get("crash") and heavy is not None and bare_rows.get(heavy.prefix):
        vs = result["takeover_vs_bare_handoff"] = _beside_bare(
            rows["crash"],
            bare_rows["bare"],
            bare_rows[heavy.prefix],
            heavy,
            bare_rows.get("fp3_", []),
        )
        for stat in ("p50", "p99"):
            goal = vs[f"{stat}_goal"]
            result["targets"].append({**goal, "value_ms": vs["crash_elected_ms"][stat]})
    ratios = {}
    ours = scenarios.get("crash", {}).get("elected_ms", {}).get("p50")
    for config in CONFIGS:
        theirs = redis.get(config.name, {}).get("takeover_ms", {}).get("p50")
        if ours and theirs:
            ratios[config.name] = {
                "crash_elected_p50_ours_over_theirs": round(ours / theirs, 6),
                "times_faster": round(theirs / ours),
            }
    result["ratios"] = ratios

    for check in result["targets"]:
        verdict = "PASS" if check["pass"] else "FAIL"
        progress(f"{verdict}  {check['target']}: {check['value_ms']} ms")
    for name, ratio in ratios.items():
        progress(
            f"crash p50 ours/{name} = {ratio['crash_elected_p50_ours_over_theirs']}"
            f" ({ratio['times_faster']}x faster)"
        )
    try:
        from bench.plots import failover_plot

        result["plot"] = str(failover_plot(result, RESULTS / "failover.png"))
    except ImportError as exc:
        result["plot"] = f"not drawn: {exc}"
    return result


def main() -> int:
    return run_main(run, "failover")


if __name__ == "__main__":
    sys.exit(main())
