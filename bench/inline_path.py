"""`python -m bench.inline_path`: the database part of a leader's inline execution,
step by step, at a trickle.

One embedded PostgreSQL, one connection, no HTTP, nothing else running: N signals
(default 400, the first 50 not counted) go one at a time through the statements a
leader sends for a signal it received itself (store without NOTIFY, fenced claim,
paper-broker send, record), each in its own autocommit transaction, as the
gateway sends them. Wall time of each step (p50/p95/p99). This is the floor under
the answer latency of `200 executed`: HTTP, Python and queueing come on top.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench.harness import progress, run_main, statement_server, webhook_body
from bench.stats import summary
from service.intake.inbox import Incoming, store_signals
from service.intake.signals import fingerprint, parse_body
from service.queries import QUERIES

__all__ = ["main"]

_STEPS = ("store", "claim", "send", "record", "total")
# The gateway's own statements, by name: what the executor and the paper broker run.
_CLAIM = QUERIES["claim_signals"]
_PLACE = QUERIES["paper_place_orders"]
_COMPLETE = QUERIES["complete_orders"]


async def _trace(dsn: str, n: int, skip: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in _STEPS}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for i in range(n):
            now = datetime.now(UTC)
            parsed = parse_body(
                webhook_body(f"in{i}"), now=now, max_future_skew=timedelta(seconds=5)
            )
            item = Incoming(parsed.signal, fingerprint(parsed.signal), notify=False)
            t0 = time.perf_counter()
            (stored,) = await store_signals(conn, [item], "bench")
            t1 = time.perf_counter()
            claim = ["gateway", 1, [stored.signal_id], "bench", "paper", timedelta(hours=1),
                     None, timedelta(0), "wait"]  # fmt: skip
            cur = await conn.execute(_CLAIM, claim)
            (claimed,) = await cur.fetchall()
            columns = [c.name for c in cur.description or ()]
            got = dict(zip(columns, claimed, strict=True))
            coid, instrument = got["client_order_id"], got["instrument"]
            target, price = got["target_position"], got["price"]
            t2 = time.perf_counter()
            valid = datetime.now(UTC) + timedelta(seconds=5)
            order = [[coid], [instrument], [target], [price], [1], ["bench"], [valid]]
            await conn.execute(_PLACE, order)
            t3 = time.perf_counter()
            await conn.execute(_COMPLETE, [[coid], ["filled"], ["paper-1"], [None], [None]])
            t4 = time.perf_counter()
            if i >= skip:  # plans and caches warm by then
                spans = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)
                for step, seconds in zip(_STEPS, spans, strict=True):
                    times[step].append(seconds * 1000)
            await asyncio.sleep(0.005)
        cur = await conn.execute("select count(*) from gateway.signals where status = 'executed'")
        row = await cur.fetchone()
    assert row is not None and row[0] == n, f"{row} of {n} executed"
    return times


async def run() -> dict[str, Any]:
    n = int(os.environ.get("N", "400"))
    skip = min(50, n // 4)
    async with statement_server() as dsn:
        times = await _trace(dsn, n, skip)
    steps = {step: summary(values) for step, values in times.items()}
    for step, s in steps.items():
        progress(f"{step:7} p50 {s['p50']} p95 {s['p95']} p99 {s['p99']} ms")
    return {
        "benchmark": "inline_path",
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "signals": n - skip,
        "wall_ms": steps,
    }


def main() -> int:
    return run_main(run, "inline_path")


if __name__ == "__main__":
    sys.exit(main())
