"""`python -m bench.batch_cost`: what one signal costs PostgreSQL in the statements the
gateway sends, as a function of the executor's batch size.

One embedded PostgreSQL, one connection, no HTTP and no other load. For batch sizes
1, 10 and 50 (BATCH_SIZES), N signals (default 3000) are stored pending and then
claimed, sent to the paper broker and recorded by the executor's own statements,
that many at a time; REPEAT times (default 5) each, the median is reported (single
runs vary by a third: buffer writes, hint bits, checkpoints). The CPU of the connection's backend process (/proc, utime+stime)
is read around each phase; a least-squares line through the per-batch costs gives
the fixed cost of a batch statement and the cost of each signal in it. The inbox
write (the group commit of received signals, with the NOTIFY a follower sends; a
second connection LISTENs, its backend's CPU is the delivery cost) is measured
the same way for writes of 1 and 10 signals (WRITE_SIZES), with the client's own
Python CPU beside it. Clock ticks are 10 ms: N x the statements keeps the error
of each figure under a few microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench.harness import progress, run_main, statement_server, webhook_body
from service.intake.inbox import Incoming, parse_notification, store_signals
from service.intake.signals import fingerprint, parse_body
from service.queries import QUERIES

__all__ = ["main"]

_TICK = os.sysconf("SC_CLK_TCK")
# The gateway's own statements, by name: what the executor and the paper broker run.
_CLAIM = QUERIES["claim_signals"]
_PLACE = QUERIES["paper_place_orders"]
_COMPLETE = QUERIES["complete_orders"]


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _fit(points: list[tuple[int, float]]) -> dict[str, float]:
    """Least squares: cost of a batch (us) = fixed + per_signal x size."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(c for _, c in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (c - my) for b, c in points) / sxx if sxx else 0.0
    return {"fixed_us": round(my - slope * mx, 1), "per_signal_us": round(slope, 1)}


async def _store_pending(conn: psycopg.AsyncConnection[Any], n: int, tag: str) -> list[int]:
    cur = await conn.execute(
        "insert into gateway.signals (fingerprint, type, instrument, position, lots, price,"
        " signal_at, payload, received_by)"
        # one instrument each: an instrument has one order in flight, so a batch's
        # signals are of as many instruments
        " select %s || g, 'BASE_ENTRY', %s || g, 'Long_1', 1, 100, now(), '{}', 'bench'"
        "   from generate_series(1, %s) g returning id",
        [tag, tag, n],
    )
    return [int(r[0]) for r in await cur.fetchall()]


async def _batches(dsn: str, n: int, size: int, run: int) -> dict[str, Any]:
    tag = f"b{size}r{run}_"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        pid = conn.info.backend_pid
        ids = await _store_pending(conn, n, tag)
        epoch = 1
        valid = datetime.now(UTC) + timedelta(hours=1)
        cost: dict[str, float] = {}
        orders: list[tuple[Any, ...]] = []
        began = _cpu(pid)
        for i in range(0, n, size):
            args = ["gateway", epoch, ids[i : i + size], "bench", "paper", timedelta(hours=1),
                    None, timedelta(0), "wait"]  # fmt: skip
            cur = await conn.execute(_CLAIM, args)
            orders += [r for r in await cur.fetchall() if r[1] and r[3]]
        cost["claim"] = _cpu(pid) - began
        began = _cpu(pid)
        for i in range(0, len(orders), size):
            part = orders[i : i + size]
            columns = [  # client order id, instrument, target, price, epoch, instance, valid
                [r[3] for r in part], [r[4] for r in part], [r[8] for r in part],
                [r[9] for r in part], [epoch] * len(part), ["bench"] * len(part),
                [valid] * len(part),
            ]  # fmt: skip
            await conn.execute(_PLACE, columns)
        cost["broker"] = _cpu(pid) - began
        began = _cpu(pid)
        for i in range(0, len(orders), size):
            coids = [r[3] for r in orders[i : i + size]]
            k = len(coids)
            await conn.execute(
                _COMPLETE, [coids, ["filled"] * k, ["b"] * k, [None] * k, [None] * k]
            )
        cost["complete"] = _cpu(pid) - began
        cur = await conn.execute(
            "select count(*) from gateway.signals where status = 'executed'"
            " and fingerprint like %s",
            [f"{tag}%"],
        )
        row = await cur.fetchone()
    assert row is not None and row[0] == n, f"batch {size}: {row} of {n} executed"
    per_signal = {k: round(v / n * 1e6, 1) for k, v in cost.items()}
    per_signal["total"] = round(sum(per_signal.values()), 1)
    return {"batch_size": size, "signals": n, "backend_cpu_us_per_signal": per_signal}


async def _hear(listener: psycopg.AsyncConnection[Any], n: int, done: asyncio.Event) -> None:
    heard = 0
    async for note in listener.notifies():
        heard += len(parse_notification(note.payload))
        if heard >= n:
            done.set()


async def _inserts(dsn: str, n: int, sizes: list[int]) -> dict[str, Any]:
    """Per signal, storing n signals in writes of each size (the inbox's group
    commit), with the NOTIFY a follower sends and a listener hearing it."""
    out: dict[str, Any] = {}
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
    ):
        await listener.execute("listen gateway_signals")
        pid, lpid = conn.info.backend_pid, listener.info.backend_pid
        for size in [0, *sizes]:  # 0: a warm-up of caches and plans, not reported
            items = []
            for i in range(n):
                body = webhook_body(f"ins{size}_{i}")
                p = parse_body(body, now=datetime.now(UTC), max_future_skew=timedelta(seconds=5))
                items.append(Incoming(p.signal, fingerprint(p.signal)))
            all_heard = asyncio.Event()
            task = asyncio.create_task(_hear(listener, n, all_heard))
            b0, l0, p0 = _cpu(pid), _cpu(lpid), time.process_time()
            for start in range(0, n, size or 10):
                await store_signals(conn, items[start : start + (size or 10)], "bench")
            await asyncio.wait_for(all_heard.wait(), 30)
            cost = {
                "backend_cpu_us": round((_cpu(pid) - b0) / n * 1e6, 1),
                "listener_backend_cpu_us": round((_cpu(lpid) - l0) / n * 1e6, 1),
                "client_python_cpu_us": round((time.process_time() - p0) / n * 1e6, 1),
            }
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if size:
                out[f"write_of_{size}"] = cost
    return out


async def run() -> dict[str, Any]:
    n = int(os.environ.get("N", "3000"))
    repeat = int(os.environ.get("REPEAT", "5"))
    sizes = [int(s) for s in os.environ.get("BATCH_SIZES", "1,10,50").split(",")]
    async with statement_server() as dsn:
        write_sizes = [int(s) for s in os.environ.get("WRITE_SIZES", "1,10").split(",")]
        inserts = await _inserts(dsn, n, write_sizes)
        progress(f"inbox insert: {inserts}")
        batches = []
        for size in sizes:
            runs = [await _batches(dsn, n, size, r) for r in range(repeat)]
            phases = runs[0]["backend_cpu_us_per_signal"].keys()
            median = {
                k: statistics.median(r["backend_cpu_us_per_signal"][k] for r in runs)
                for k in phases
            }
            batches.append(
                {"batch_size": size, "signals": n, "runs": repeat,
                 "backend_cpu_us_per_signal": median,
                 "each_run": [r["backend_cpu_us_per_signal"] for r in runs]}
            )  # fmt: skip
            progress(f"batch {size:3}: median of {repeat} {median} us/signal")
    fits = {}
    for phase in ("claim", "broker", "complete"):
        points = [(b["batch_size"], b["backend_cpu_us_per_signal"][phase] * b["batch_size"])
                  for b in batches]  # fmt: skip
        fits[phase] = _fit(points)
    progress(f"per batch statement: {fits}")
    return {
        "benchmark": "batch_cost",
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "inbox_insert": inserts,
        "batches": batches,
        "fit_us": fits,
    }


def main() -> int:
    return run_main(run, "batch_cost")


if __name__ == "__main__":
    sys.exit(main())
