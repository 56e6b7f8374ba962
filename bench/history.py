"""`python -m bench.history`: what a long history of terminal signals costs the
gateway, and what deleting it (retention) costs while webhooks flow.

One `pgleader serve` instance, the leader (it answers the webhook, sweeps and runs
the jobs: what is measured runs there, as in bench.burst and bench.slow_clients), on
an embedded PostgreSQL, started with PGLEADER_RETENTION_DAYS=1 (its first retention
run, at election, finds nothing to delete; the next is an hour later) and
PGLEADER_STATISTICS_INTERVAL=86400 (the statistics job reads the last 30 days of
signals: its cost is timed apart, below, not left to fall at random into a phase).

Each phase starts from a flat ledger: every open position closed and the paper book
emptied, with the gateway idle (the load opens a position with every signal, and a
signal's cost grows with its instrument's open positions and paper orders; see
_FLATTEN). The load is bench.webhook's: distinct BASE_ENTRY signals on 50 instruments.

    quiet      gateway.signals empty. The webhook: --rate signals/s for --seconds,
               posted to the leader (bench.webhook's gateway_step: open loop, latency
               from the scheduled send, answers by status, CPU, disk flushes), after a
               warm-up of 3 s not reported; WAL per signal, and every active database
               session's wait event every 0.25 s meanwhile. The sweep: SWEEPS (200)
               runs, one after the other on one psycopg connection with the gateway
               idle, of the statements the leader's sweep runs each second
               (trading_halt; pending_signals with the executor's limit 1000;
               executing_signals with the settle time 30 s and limit 100), each run
               timed as a whole, after 10 runs not reported (psycopg prepares a
               statement at its 5th run, as in the gateway's pool). Also
               the statistics job's query, twice (the first counts every day; the
               second only the days that can still change).
    grown      --rows terminal signals added by one INSERT ... SELECT generate_series:
               executed, received from 40 to 10 days ago in id order, 50 instruments,
               unique sha256 fingerprints (as real ones: random in their index), the
               payload a real signal stores; then VACUUM ANALYZE (the database) and
               a CHECKPOINT (the bulk load's own writes are not what this phase
               measures). The same measurements; the ratios grown / quiet.
    retention  `pgleader jobs run retention --election gateway` (a subprocess, as an
               operator runs it; again while a run leaves rows to its next, its
               25-min budget spent, --retention-runs times at most) while the
               webhook takes --rate in 2 s windows for as long as the runs last (the
               last window ends up to 2 s after them; 50 new
               instruments after every --seconds of windows, so that no instrument
               gathers more than in a measured step): rows deleted (the job's own
               count), seconds (the job's), rows/s, a timeline of the deletion rate
               (the table's n_tup_del) beside the webhook's p99, WAL written,
               autovacuums of gateway.signals meanwhile, the database sessions' wait
               events, and the webhook's answers against the quiet run's.

Goals (reported, not asserted): with the history, webhook p99 and sweep mean within
20 % of the quiet run's (the sweep net of its statements' bare round trips: each run
also times a `select 1` on the same connection, which no history can slow, and
which after the bulk load was seen to cost as much more as every sweep statement
did, the one reading a one-row table too); during retention, webhook p99 at most 2x
the quiet run's.

Options: --rows (10000000), --rate (200), --seconds (30, per measured step),
--retention-runs (0: until none is left), --no-retention (quiet and grown only:
about 6 min), --out (results/history.json). Knobs
(environment): SWEEPS (200), LOADGEN_CONNECTIONS (500), SETTLE_TIMEOUT (60 s),
PG_SETTINGS, and any PGLEADER_* setting of `serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

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
from bench.loadgen import Client, Step, open_loop, session
from bench.procstat import Meter
from bench.stats import summary
from bench.webhook import gateway_step
from pgleader.queries import QUERIES as LIBRARY_QUERIES
from service.queries import QUERIES

__all__ = ["main"]

ELECTION = "gateway"
WARMUP_S = 3.0
SWEEP_WARMUP = 10
WINDOW_S = 2.0  # load windows during retention: the load stops this soon after the run
SAMPLE_S = 0.25

# What the leader's sweep loop runs each second (service/gateway.py `_sweep_loop`):
# the kill switch, Executor.sweep (limit 1000), Executor.reconcile (limit 100, the
# broker settle time of 30 s as grace; the epoch is passed but not used by the query).
# Each is named at its execute() (tests/gateway/test_security.py holds every named
# query to that), so the three live in one function rather than a table of texts.
SWEEP = ("trading_halt", "pending_signals", "executing_signals")
# The control: what any statement costs on this connection, history or not (the
# client's and the server's per-statement work, the machine's state). A sweep that
# reads its index as fast with the history as without costs more only by as much as
# this round trip does; the goal is judged net of it.
_ROUND_TRIP = "select 1"


async def _sweep_once(
    conn: psycopg.AsyncConnection[Any], epoch: int, timings: dict[str, float]
) -> None:
    """One run of the sweep's statements; each one's ms into `timings`, and a bare round
    trip's (`select 1` on the same connection, not part of the sweep) into "round_trip"."""
    clock = time.perf_counter
    at = clock()
    await (await conn.execute(_ROUND_TRIP)).fetchall()
    timings["round_trip"] = (clock() - at) * 1000
    at = clock()
    await (await conn.execute(QUERIES["trading_halt"])).fetchall()
    timings["trading_halt"] = (clock() - at) * 1000
    at = clock()
    await (await conn.execute(QUERIES["pending_signals"], [1000])).fetchall()
    timings["pending_signals"] = (clock() - at) * 1000
    at = clock()
    reconcile = {"epoch": epoch, "grace": timedelta(seconds=30), "limit": 100}
    await (await conn.execute(QUERIES["executing_signals"], reconcile)).fetchall()
    timings["executing_signals"] = (clock() - at) * 1000


# How gateway.signals was read: sequential scans and rows they read, index scans
# (pg_stat_force_next_flush() makes this session's counts visible at once).
_SIGNAL_SCANS = """
select seq_scan, seq_tup_read, coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0)
from pg_stat_user_tables where relid = 'gateway.signals'::regclass
"""
_FLUSH_STATS = "select pg_stat_force_next_flush()"


_HISTORY = """
insert into gateway.signals
    (fingerprint, type, instrument, position, side, lots, price, stop, signal_at, payload,
     received_by, received_at, status, claimed_epoch, claimed_by, claimed_at, finished_at,
     updated_at)
select encode(sha256(convert_to('history:' || g, 'UTF8')), 'hex'),
       'BASE_ENTRY', 'HIST_' || g %% 50, 'Long_' || 1 + g %% 5, 'long', 1, 52000.5, 51500,
       t - interval '300 ms',
       jsonb_build_object('type', 'BASE_ENTRY', 'instrument', 'HIST_' || g %% 50,
                          'position', 'Long_' || 1 + g %% 5, 'side', 'long', 'lots', 1,
                          'price', '52000.5', 'stop', '51500',
                          'timestamp', to_char((t - interval '300 ms') at time zone 'UTC',
                                               'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                          'extra', '{}'::jsonb),
       'history', t, 'executed', 1, 'history', t + interval '2 ms', t + interval '40 ms',
       t + interval '40 ms'
  from generate_series(1, %s::bigint) g,
       lateral (select now() - interval '40 days'
                       + interval '30 days' * ((g - 1)::float8 / %s)) x (t)
"""

# What retention may delete (by signals_finished_idx, whose predicate this repeats).
_OLD = """
select count(*) from gateway.signals
 where status in ('executed', 'failed', 'rejected', 'expired')
   and finished_at < now() - make_interval(days => %s)
"""

_TABLE = """
select n_live_tup, n_dead_tup, n_tup_del, autovacuum_count, autoanalyze_count,
       last_autovacuum, pg_relation_size(relid), pg_indexes_size(relid),
       pg_total_relation_size(relid)
  from pg_stat_user_tables where schemaname = 'gateway' and relname = 'signals'
"""

_INDEXES = """
select indexrelname, pg_relation_size(indexrelid) from pg_stat_user_indexes
 where schemaname = 'gateway' and relname = 'signals' order by 1
"""

# The load opens a position with every signal and never closes one (bench.webhook's
# BASE_ENTRY signals), and a claim sums the instrument's open positions, the paper
# broker its every request of the instrument: a signal's cost grows with what earlier
# load left (no history, no retention, 200/s on 50 instruments: webhook p99 82 ms over
# the first 6000 signals, 1-2 s past 35000). So each phase starts flat, ledger and paper
# book alike (the reconciliation still matches), and the retention phase moves to 50
# new instruments after every --seconds of load (as many signals as a measured step).
_FLATTEN = """
with closed as (update gateway.positions set status = 'closed', exit_at = now()
                 where status = 'open' returning 1),
     booked as (delete from gateway.paper_broker_requests returning 1)
select (select count(*) from closed), (select count(*) from booked)
"""
_OPEN_POSITIONS = "select count(*) from gateway.positions where status = 'open'"
# delete_old_signals' choice of rows (sql/gateway/functions.sql), for its plan.
_RETAIN_PLAN = """
explain (format json)
select s.id from gateway.signals s
 where s.status in ('executed', 'failed', 'rejected', 'expired')
   and s.finished_at < now() - make_interval(days => %s)
   and not exists (select from gateway.positions p where p.status = 'open' and p.signal_id = s.id)
 order by s.finished_at limit 1000 for update skip locked
"""
_DELETED = (
    "select n_tup_del from pg_stat_user_tables where schemaname = 'gateway' and relname = 'signals'"
)
_WAITING = """
select a.wait_event, a.query, extract(epoch from now() - a.state_change),
       (select string_agg(distinct b.query, ' | ') from pg_stat_activity b
         where b.pid = any(pg_blocking_pids(a.pid)))
  from pg_stat_activity a where a.wait_event_type = 'Lock' and a.pid <> pg_backend_pid()
"""
# What the session running a retention batch is doing (no wait event: on the CPU).
_RETAINING = """
select coalesce(wait_event_type || ': ' || wait_event, 'on CPU') from pg_stat_activity
 where state = 'active' and query like '%%delete_old_signals%%' and pid <> pg_backend_pid()
"""
# Every active session but this one, by what it waits for (none: on the CPU).
_ACTIVE = """
select case when backend_type = 'client backend' then '' else backend_type || ' ' end
       || coalesce(wait_event_type || ': ' || wait_event, 'on CPU')
  from pg_stat_activity where state = 'active' and pid <> pg_backend_pid()
"""
_WAL = "select wal_bytes from pg_stat_wal"
_LEADERSHIP = """
select epoch, instance_id, acquired_at, released_at, release_reason
  from pgleader.leadership_history where election = %s order by epoch
"""
_STATISTICS = "select gateway.compute_statistics(%s, 30)"

_PHASE_SIGNALS = """
select status, count(*) from gateway.signals
 where received_at >= %s and starts_with(position, %s) group by 1
"""


def _instrument(i: int, group: str = "") -> str:
    # bench.webhook's 50 instruments: one order in flight per instrument at a time.
    return f"BENCH_{group}{i % 50}"


async def _flatten(cluster: Cluster) -> dict[str, int]:
    """Close every open position and empty the paper book, with the gateway idle.
    No ANALYZE: statistics of gateway.positions taken with none open make retention's
    batch plan scan every open position once per row (see the README)."""
    closed, booked = (await cluster.query(_FLATTEN))[0]
    return {"positions_closed": int(closed), "paper_requests_removed": int(booked)}


def _mb(n: Any) -> float:
    return round(int(n) / 2**20, 1)


def _ratio(a: Any, b: Any) -> float | None:
    return round(float(a) / float(b), 3) if a is not None and b else None


# -- measurements -------------------------------------------------------------------


async def _table(cluster: Cluster) -> dict[str, Any]:
    row = (await cluster.query(_TABLE))[0]
    live, dead, deleted, autovacuums, autoanalyzes, last_av, heap, indexes, total = row
    return {
        "live_rows": live,
        "dead_rows": dead,
        "n_tup_del": deleted,
        "autovacuum_count": autovacuums,
        "autoanalyze_count": autoanalyzes,
        "last_autovacuum": last_av,
        "heap_mb": _mb(heap),
        "indexes_mb": _mb(indexes),
        "total_mb": _mb(total),
        "index_mb": {name: _mb(size) for name, size in await cluster.query(_INDEXES)},
        "open_positions": await cluster.scalar(_OPEN_POSITIONS),
    }


async def _jobs(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """The leader's jobs as `pgleader jobs` shows them: which ran when, and their result."""
    async with await psycopg.AsyncConnection.connect(cluster.dsn, autocommit=True) as conn:
        cur = await conn.execute(LIBRARY_QUERIES["job_list"], {"election": ELECTION})
        names = [c.name for c in cur.description or []]
        rows = await cur.fetchall()
    keep = ("next_due_at", "started_at", "finished_at", "outcome", "duration_s", "runs", "result")
    return {row[names.index("job")]: {k: row[names.index(k)] for k in keep} for row in rows}


async def sweep_cost(dsn: str, epoch: int, runs: int) -> dict[str, Any]:
    """`runs` runs of the sweep's statements, one after the other: ms per run and per
    statement, and how they read gateway.signals (sequential scans and the rows they
    read, index scans) over the reported runs: with a long history, a sweep that
    reads the table sequentially would show here, not only in its time."""
    per_run: list[float] = []
    per_statement: dict[str, list[float]] = {name: [] for name in (*SWEEP, "round_trip")}
    clock = time.perf_counter
    timings: dict[str, float] = {}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(SWEEP_WARMUP):
            await _sweep_once(conn, epoch, timings)
        await conn.execute(_FLUSH_STATS)
        before = await (await conn.execute(_SIGNAL_SCANS)).fetchone()
        for _ in range(runs):
            await _sweep_once(conn, epoch, timings)
            per_run.append(sum(timings[name] for name in SWEEP))
            for name, ms in timings.items():
                per_statement[name].append(ms)
        await conn.execute(_FLUSH_STATS)
        after = await (await conn.execute(_SIGNAL_SCANS)).fetchone()
        statistics_ms: list[float] = []
        for _ in range(2):  # the first run counts every day; the next only days that change
            began = clock()
            await conn.execute(_STATISTICS, [ELECTION])
            statistics_ms.append((clock() - began) * 1000)
    assert before is not None and after is not None
    scans = dict(zip(("seq_scans", "seq_rows_read", "index_scans", "index_rows_fetched"),
                     (a - b for a, b in zip(after, before, strict=True)), strict=True))  # fmt: skip
    run_ms = summary(per_run, 3)
    return {
        "runs": runs,
        "per_run_ms": {"mean": run_ms["mean"], "p50": run_ms["p50"], "p99": run_ms["p99"],
                       "max": run_ms["max"]},
        "per_statement_mean_ms": {
            name: round(sum(v) / len(v), 3) for name, v in per_statement.items() if v
        },
        "signals_read": scans,
        "statistics_job_query_ms": round(statistics_ms[0], 1),
        "statistics_job_query_again_ms": round(statistics_ms[1], 1),
    }  # fmt: skip


def _nodes(plan: dict[str, Any]) -> list[str]:
    """The plan's nodes, depth first: 'Index Scan on signals_pending_idx', ..."""
    name = plan["Node Type"]
    if "Index Name" in plan:
        name += f" using {plan['Index Name']}"
    elif "Relation Name" in plan:
        name += f" on {plan['Relation Name']}"
    return [name, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


async def measure(
    cluster: Cluster, http: Client, rate: float, seconds: float, runs: int, label: str
) -> dict[str, Any]:
    """A flat ledger, a warm-up, the webhook step, then the sweep's statements with the
    gateway idle."""
    flattened = await _flatten(cluster)
    leader, epoch = await cluster.leader()
    url = f"{leader.url}/webhook"
    await open_loop(
        http, [url], rate, WARMUP_S, lambda i: webhook_body(f"{label}warm_{i}", _instrument(i))
    )
    await asyncio.sleep(1)
    sampler = Sampler(cluster.dsn, time.monotonic())
    wal0 = await cluster.scalar(_WAL)
    sampler.start()
    try:
        webhook = await gateway_step(cluster, http, "leader", rate, seconds)
    finally:
        await sampler.stop()
    wal = await cluster.scalar(_WAL) - wal0
    webhook["wal_kb_per_signal"] = round(wal / 1024 / max(1, webhook["answered_2xx"]), 2)
    webhook["database_samples"] = sampler.report()
    sweep = await sweep_cost(cluster.dsn, epoch, runs)
    progress(
        f"{label}: webhook p50 {webhook['latency_ms']['p50']} p99 {webhook['latency_ms']['p99']}"
        f" ms, answers {webhook['answers']}, WAL {webhook['wal_kb_per_signal']} kB/signal;"
        f" sweep mean {sweep['per_run_ms']['mean']} p99"
        f" {sweep['per_run_ms']['p99']} ms; statistics query {sweep['statistics_job_query_ms']} ms,"
        f" again {sweep['statistics_job_query_again_ms']} ms"
    )
    return {
        "flattened_before": flattened,
        "webhook": webhook,
        "sweep": sweep,
        "table": await _table(cluster),
    }


async def grow(cluster: Cluster, rows: int) -> dict[str, Any]:
    """Insert the history, VACUUM ANALYZE, CHECKPOINT: how long each took, WAL, sizes."""
    wal0 = await cluster.scalar(_WAL)
    progress(f"inserting {rows} terminal signals ...")
    began = time.monotonic()
    await cluster.query(_HISTORY, rows, rows)
    inserted = time.monotonic()
    wal1 = await cluster.scalar(_WAL)
    progress(f"inserted in {inserted - began:.1f} s; vacuum analyze ...")
    # The whole database: statistics of every table as autovacuum would keep them (the
    # load's positions included: delete_old_signals' plan depends on them).
    await cluster.query("vacuum (analyze)")
    vacuumed = time.monotonic()
    await cluster.query("checkpoint")
    done = time.monotonic()
    progress(f"vacuum analyze {vacuumed - inserted:.1f} s, checkpoint {done - vacuumed:.1f} s")
    return {
        "rows": rows,
        "insert_s": round(inserted - began, 1),
        "insert_rows_per_s": round(rows / max(inserted - began, 1e-9)),
        "insert_wal_mb": _mb(wal1 - wal0),
        "vacuum_analyze_s": round(vacuumed - inserted, 1),
        "checkpoint_s": round(done - vacuumed, 1),
    }


async def _old_rows(cluster: Cluster, days: int) -> int:
    return int(await cluster.scalar(_OLD, days))


class Sampler:
    """Every SAMPLE_S: the table's n_tup_del (backends report it about once a second),
    every active session by its wait event, and the sessions waiting on a lock
    (heavyweight: rows, transactions) by what they run and what blocks them: where
    the database's time goes, the deletion rate, and convoys beside the answers."""

    def __init__(self, dsn: str, began: float) -> None:
        self.dsn, self.began = dsn, began
        self.deleted: list[tuple[float, int]] = []
        self.samples = 0
        self.waiting: list[tuple[float, int]] = []  # (t, sessions waiting on a lock)
        self.waits: Counter[str] = Counter()  # "wait_event: query head" -> samples
        self.blockers: Counter[str] = Counter()  # what they waited for -> samples
        self.retaining: Counter[str] = Counter()  # the retention batch's wait -> samples
        self.active: Counter[str] = Counter()  # every active session's wait -> samples
        self.longest_wait_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            while True:
                t = time.monotonic() - self.began
                cur = await conn.execute(_DELETED)
                row = await cur.fetchone()
                self.deleted.append((t, int(row[0]) if row else 0))
                cur = await conn.execute(_WAITING)
                rows = await cur.fetchall()
                self.samples += 1
                self.waiting.append((t, len(rows)))
                for event, query, waited, blockers in rows:
                    self.waits[f"{event}: {_head(query)}"] += 1
                    for blocker in str(blockers or "").split(" | "):
                        self.blockers[_head(blocker)] += 1
                    self.longest_wait_s = max(self.longest_wait_s, float(waited or 0))
                cur = await conn.execute(_RETAINING)
                self.retaining.update(str(r[0]) for r in await cur.fetchall())
                cur = await conn.execute(_ACTIVE)
                self.active.update(str(r[0]) for r in await cur.fetchall())
                await asyncio.sleep(SAMPLE_S)

    def report(self) -> dict[str, Any]:
        counts = [n for _, n in self.waiting]
        report = {
            "samples": self.samples,
            "every_s": SAMPLE_S,
            "active_sessions_seen": dict(self.active.most_common(12)),
            "samples_with_a_lock_wait": sum(1 for n in counts if n),
            "most_sessions_waiting": max(counts, default=0),
            "longest_wait_seen_s": round(self.longest_wait_s, 3),
            "waiting_by_statement": dict(self.waits.most_common(8)),
            "blocked_by_statement": dict(self.blockers.most_common(8)),
        }
        if self.retaining:
            report["retention_batch_seen"] = dict(self.retaining.most_common(8))
        return report


def _head(query: Any) -> str:
    return " ".join(str(query).split())[:70]


def _merge(steps: list[Step], rate: float) -> Step:
    """Consecutive windows as one step (for its report)."""
    merged = Step(rate, sum(s.duration for s in steps))
    for s in steps:
        merged.sent += s.sent
        merged.answers.update(s.answers)
        merged.errors.update(s.errors)
        merged.timeouts += s.timeouts
        merged.latencies_ms += s.latencies_ms
        merged.send_lag_ms += s.send_lag_ms
        merged.span += s.span
        if s.aborted_at is not None and merged.aborted_at is None:
            merged.aborted_at = s.aborted_at
    return merged


def _timeline(
    windows: list[tuple[float, Step]], sampler: Sampler, end: float
) -> list[dict[str, Any]]:
    """Per bucket of the run (about 40 of them, at least 5 s): rows deleted per second
    (from the n_tup_del samples) beside the webhook's p99 and max in its windows, and
    the most sessions seen waiting on a lock."""
    deletions = sampler.deleted
    bucket = max(5.0, end / 40)
    out = []
    at = 0.0
    while at < end:
        upto = min(at + bucket, end)
        inside = [n for t, n in deletions if at <= t < upto + 1e-9]
        before = [n for t, n in deletions if t < at]
        base = before[-1] if before else (inside[0] if inside else 0)
        deleted = (inside[-1] - base) if inside else 0
        lat = [x for t, s in windows if at <= t < upto for x in s.latencies_ms]
        stats = summary(lat) if lat else {"p99": None, "max": None}
        waiting = max((n for t, n in sampler.waiting if at <= t < upto), default=0)
        out.append({"t_s": round(at, 1), "deleted_per_s": round(deleted / (upto - at)),
                    "webhook_p99_ms": stats["p99"], "webhook_max_ms": stats["max"],
                    "lock_waiters_max": waiting})  # fmt: skip
        at = upto
    return out


async def _run_retention(dsn: str, runs: int) -> list[dict[str, Any]]:
    """`pgleader jobs run retention` (a subprocess, as an operator runs it) again
    while the last run left rows for the next ("more remain": its time budget ran
    out), `runs` times at most (0: until none is left); each run's JSON answer."""
    answers: list[dict[str, Any]] = []
    while True:
        proc = await uninterrupted(asyncio.create_subprocess_exec(
            sys.executable, "-m", "pgleader", "jobs", "run", "retention", "--election",
            ELECTION, "--timeout", "3600", "--dsn", dsn,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        ))  # fmt: skip
        try:
            out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.terminate()
                await uninterrupted(proc.wait())
        try:
            answer: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            answer = {"outcome": None, "error": (out + err).decode(errors="replace")[-500:]}
        answers.append(answer)
        progress(f"retention run {len(answers)}: {answer.get('result') or answer}")
        if "more remain" not in str(answer.get("result")) or len(answers) == runs:
            return answers


async def retention_under_load(
    cluster: Cluster, http: Client, rate: float, seconds: float, days: int, runs: int
) -> dict[str, Any]:
    leader, epoch = await cluster.leader()
    url = f"{leader.url}/webhook"

    per_group = max(1, round(seconds / WINDOW_S))  # windows on one set of instruments

    def window(w: int) -> Callable[[int], bytes]:
        # Positions unique over the windows, as in the other phases' steps.
        group = f"R{w // per_group}_"
        return lambda i: webhook_body(f"ret{w}_{i}", _instrument(i, group))

    flattened = await _flatten(cluster)
    old_before = await _old_rows(cluster, days)
    table_before = await _table(cluster)
    plan = await cluster.scalar(_RETAIN_PLAN, days)
    wal0 = await cluster.scalar(_WAL)
    since = await cluster.clock() - timedelta(seconds=1)
    progress(f"retention: {old_before} signals older than {days} day(s); running the job ...")
    meter = Meter({leader.instance_id: leader.pid}, cluster.server.postmaster_pid())
    probe = FlushProbe(cluster.workdir)
    began = time.monotonic()
    db_began = await cluster.clock()
    sampler = Sampler(cluster.dsn, began)
    sampler.start()
    meter.start()
    probe.start()
    cli = asyncio.create_task(_run_retention(cluster.dsn, runs))
    windows: list[tuple[float, Step]] = []
    try:
        while not cli.done():
            at = time.monotonic() - began
            step = await open_loop(http, [url], rate, WINDOW_S, window(len(windows)))
            windows.append((at, step))
        answers = await cli
        cli_done = time.monotonic() - began
    finally:
        if not cli.done():
            cli.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cli
        flushes = probe.stop()
        usage = await meter.stop()
        await sampler.stop()
    answer = answers[0] if answers else {"outcome": None}
    wal1 = await cluster.scalar(_WAL)
    old_after = await _old_rows(cluster, days)
    table_after = await _table(cluster)
    counts = [re.match(r"(\d+) signal", str(a.get("result") or "")) for a in answers]
    deleted = (
        sum(int(m.group(1)) for m in counts if m)
        if answers and all(counts)
        else old_before - old_after
    )
    durations = [float(a["duration_s"]) for a in answers if a.get("duration_s") is not None]
    took = sum(durations) if answers and len(durations) == len(answers) else None
    # The job's run in the phase's clock: windows that started before it ended count.
    offset = None
    if answer.get("started_at"):
        started = datetime.fromisoformat(str(answer["started_at"]))
        offset = (started - db_began).total_seconds()
    during = [s for at, s in windows if at < cli_done]
    report = _merge(during, rate).report()
    settled = await _settle(cluster, since, "ret")
    _, epoch_after = await cluster.leader()
    progress(
        f"retention: {answer.get('outcome')}, {deleted} rows in {took} s"
        f" ({_ratio(deleted, took)} rows/s); webhook p99 {report['latency_ms']['p99']} ms,"
        f" answers {report['answers']}"
    )
    return {
        "job": answer,
        "runs": answers,
        "flattened_before": flattened,
        "instruments_per_window_group": {"instruments": 50, "windows": per_group},
        "old_rows_before": old_before,
        "old_rows_after": old_after,
        "rows_deleted": deleted,
        "seconds": took,
        "rows_per_s": round(deleted / took) if took else None,
        "job_started_after_request_s": None if offset is None else round(offset, 2),
        "leadership_changed": epoch_after != epoch,
        "batch_plan_at_start": _nodes(plan[0]["Plan"]),
        "wal_mb": _mb(wal1 - wal0),
        "autovacuums_of_signals": table_after["autovacuum_count"]
        - table_before["autovacuum_count"],
        "table_before": table_before,
        "table_after": table_after,
        "webhook": {
            **report,
            "windows": len(during),
            "window_s": WINDOW_S,
            "load_s": round(cli_done, 1),
            "signals_by_status": settled,
            "cpu_s": usage["cpu_s"],
            "other_processes_cpu_s": usage["other_processes_cpu_s"],
            "max_rss_mb": usage["max_rss_mb"],
            "disk_flush_ms": flushes,
        },
        "lock_waits": sampler.report(),
        "timeline": _timeline(windows, sampler, cli_done),
    }


async def _settle(cluster: Cluster, since: datetime, tag: str) -> dict[str, int]:
    """The phase's signals by status once none is pending or executing (or after
    SETTLE_TIMEOUT)."""
    deadline = time.monotonic() + env_float("SETTLE_TIMEOUT", 60.0)
    while True:
        counts = {s: int(n) for s, n in await cluster.query(_PHASE_SIGNALS, since, tag)}
        if not counts.get("pending") and not counts.get("executing"):
            return counts
        if time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.25)


# -- the run ------------------------------------------------------------------------


def _net(sweep: dict[str, Any]) -> float:
    """The sweep's mean per run less the bare round trips of its statements, ms."""
    means = sweep["per_statement_mean_ms"]
    return round(float(sweep["per_run_ms"]["mean"]) - len(SWEEP) * float(means["round_trip"]), 3)


def _goals(
    quiet: dict[str, Any], grown: dict[str, Any], kept: dict[str, Any] | None
) -> dict[str, Any]:
    q99 = quiet["webhook"]["latency_ms"]["p99"]
    g99 = grown["webhook"]["latency_ms"]["p99"]
    r99 = None if kept is None else kept["webhook"]["latency_ms"]["p99"]
    qsweep = quiet["sweep"]["per_run_ms"]["mean"]
    gsweep = grown["sweep"]["per_run_ms"]["mean"]
    qnet, gnet = (_net(phase["sweep"]) for phase in (quiet, grown))
    ratios = {
        "webhook_p99_grown_over_quiet": _ratio(g99, q99),
        "sweep_mean_grown_over_quiet": _ratio(gsweep, qsweep),
        "sweep_mean_net_of_round_trips_grown_over_quiet": _ratio(gnet, qnet),
        "sweep_p99_grown_over_quiet": _ratio(
            grown["sweep"]["per_run_ms"]["p99"], quiet["sweep"]["per_run_ms"]["p99"]
        ),
        "webhook_p99_retention_over_quiet": _ratio(r99, q99),
        "postgres_cpu_per_1000_grown_over_quiet": _ratio(
            grown["webhook"]["cpu_s_per_1000"]["postgres"],
            quiet["webhook"]["cpu_s_per_1000"]["postgres"],
        ),
        "statistics_query_grown_over_quiet": _ratio(
            grown["sweep"]["statistics_job_query_ms"], quiet["sweep"]["statistics_job_query_ms"]
        ),
    }

    def at_most(ratio: float | None, limit: float) -> bool:
        return ratio is not None and ratio <= limit

    goals = [
        {"goal": "webhook p99 with the history within 20 % of the quiet run's",
         "quiet_ms": q99, "grown_ms": g99, "ratio": ratios["webhook_p99_grown_over_quiet"],
         "pass": at_most(ratios["webhook_p99_grown_over_quiet"], 1.2)},
        {"goal": "the leader's sweep (mean per run, net of its three statements' bare round"
                 " trips) with the history within 20 % of the quiet run's",
         "quiet_ms": qnet, "grown_ms": gnet,
         "raw_quiet_ms": qsweep, "raw_grown_ms": gsweep,
         "ratio": ratios["sweep_mean_net_of_round_trips_grown_over_quiet"],
         "pass": at_most(ratios["sweep_mean_net_of_round_trips_grown_over_quiet"], 1.2)},
    ]  # fmt: skip
    if kept is not None:
        goals.append(
            {"goal": "webhook p99 while retention deletes the history at most 2x the quiet run's",
             "quiet_ms": q99, "retention_ms": r99,
             "ratio": ratios["webhook_p99_retention_over_quiet"],
             "pass": at_most(ratios["webhook_p99_retention_over_quiet"], 2.0)
             and kept["webhook"]["errors"] == 0 and kept["webhook"]["timeouts"] == 0}
        )  # fmt: skip
    return {"ratios": ratios, "goals": goals}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    days = int(os.environ.setdefault("PGLEADER_RETENTION_DAYS", "1"))
    os.environ.setdefault("PGLEADER_STATISTICS_INTERVAL", "86400")
    runs = env_int("SWEEPS", 200)
    connections = env_int("LOADGEN_CONNECTIONS", 500)
    timings = timings_from_env()
    settings = settings_from_env()
    result: dict[str, Any] = {
        "benchmark": "history",
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "note": "the load generator, the instance and PostgreSQL share these CPUs, and"
            " other work on the machine may too (other_processes_cpu_s per step)",
            "loadavg_at_start": os.getloadavg(),
        },
        "config": {
            "rows": args.rows,
            "rate": args.rate,
            "seconds": args.seconds,
            "sweep_runs": runs,
            "instances": 1,
            "target": "leader",
            "retention_days": days,
            "retention_runs_at_most": args.retention_runs or None,
            "statistics_interval_s": float(os.environ["PGLEADER_STATISTICS_INTERVAL"]),
            "postgresql_settings": settings or None,
        },
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
    }
    if days < 1 or days >= 10:
        raise SystemExit(f"PGLEADER_RETENTION_DAYS={days}: the history is 10 to 40 days old")
    async with Cluster(1, timings, settings) as cluster, session(connections) as http:
        progress(f"1 instance on PostgreSQL at {cluster.dsn}")
        # The jobs' first runs at election (retention finds nothing yet) must be over.
        await asyncio.sleep(2)
        result["jobs_at_start"] = await _jobs(cluster)
        quiet = await measure(cluster, http, args.rate, args.seconds, runs, "quiet")
        result["quiet"] = quiet
        result["history"] = await grow(cluster, args.rows)
        grown = await measure(cluster, http, args.rate, args.seconds, runs, "grown")
        result["grown"] = grown
        result["jobs_before_retention"] = await _jobs(cluster)
        kept = None
        if not args.no_retention:
            kept = await retention_under_load(
                cluster, http, args.rate, args.seconds, days, args.retention_runs
            )
            result["retention"] = kept
        result["jobs_at_end"] = await _jobs(cluster)
        keys = ("epoch", "instance_id", "acquired_at", "released_at", "release_reason")
        result["leadership_history"] = [
            dict(zip(keys, row, strict=True)) for row in await cluster.query(_LEADERSHIP, ELECTION)
        ]
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    result.update(_goals(quiet, grown, kept))
    for goal in result["goals"]:
        progress(f"{'PASS' if goal['pass'] else 'FAIL'}  {goal['goal']}: ratio {goal['ratio']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.history", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rows", type=int, default=10_000_000, help="terminal signals to add")
    parser.add_argument("--rate", type=float, default=200.0, help="webhook signals/s")
    parser.add_argument("--seconds", type=float, default=30.0, help="per measured step")
    parser.add_argument(
        "--retention-runs", type=int, default=0,
        help="retention runs at most (a run deletes for 25 min; 0: until none is left)",
    )  # fmt: skip
    parser.add_argument(
        "--no-retention", action="store_true", help="measure quiet and grown only, no retention"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "history.json", help="JSON here")
    args = parser.parse_args()
    if args.out.suffix != ".json":
        parser.error("--out must end in .json")
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # run_main writes RESULTS / f"{name}.json": an absolute name puts it at --out.
    return run_main(lambda: run(args), str(out.with_suffix("")))


if __name__ == "__main__":
    sys.exit(main())
