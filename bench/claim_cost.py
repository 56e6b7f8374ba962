"""`python -m bench.claim_cost`: what pgleader's claim costs on a quiet server, beside
the bare handoff's bump and NOTIFY.

The claim is what a takeover runs on the server between the lock's grant and the
`elected` NOTIFY (pgleader.campaign -> claim_leadership: bump the epoch, close the
predecessor's history row, open ours, update the registry, broadcast, commit), run as
a takeover runs it, holding back for a higher priority (three instances registered),
by a session joined and rehearsed that holds the lock already: its wait is granted at
once, so the round trip is the claim's. The bare handoff (bench/handoff.py) sends an
UPDATE and a NOTIFY. ROUNDS (300) of each, interleaved, the first WARMUP (50) left
out; ms per round trip on this process's clock. An embedded PostgreSQL of its own.

Then the functions a claim, a beat or an execution calls, one by one: CALLS (3000)
calls in one server-side loop (one round trip; each call a statement of its own, as in
production), us per call, the loop run REPEAT (3) times. A SQL-language function the planner cannot inline is planned again
at every call (PostgreSQL up to 17); plpgsql plans its queries once per session.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql

from bench.harness import env_int, progress, run_main
from bench.stats import summary
from pgleader import migrate
from pgleader.embedded import EmbeddedPostgres
from pgleader.queries import QUERIES

__all__ = ["main"]

_BARE_TABLE = "create table bench_claim (id int primary key, epoch bigint not null)"
_BARE_ROW = "insert into bench_claim values (1, 0)"
_BARE_BUMP = "update bench_claim set epoch = epoch + 1 where id = 1 returning epoch"
_BARE_NOTIFY = "select pg_notify('bench_claim', 'x')"
# One server-side loop of calls per function: each call a statement of its own, with
# the function in FROM, as a claim, a beat and an execution call them (a query that
# calls a SQL function on many rows plans it once; a statement per call does not).
_LOOP = """
create function pg_temp.calls(n integer) returns void language plpgsql as $loop$
begin
    for i in 1..n loop
        perform * from {call};
    end loop;
end
$loop$
"""
_CALLS = {
    "pgleader.lock_holder": "pgleader.lock_holder(1)",
    "pgleader.preferred_candidate": "pgleader.preferred_candidate('bench', 'a', 0, '6 s')",
    "gateway.open_position": "gateway.open_position('NIFTY')",
    "gateway.complete_orders": "gateway.complete_orders("
    "array['none'], array['filled'], array['b'], array[null], array[null])",
}


async def _per_call(conn: psycopg.AsyncConnection[Any]) -> dict[str, list[float]]:
    """us per call of each function of _CALLS, REPEAT loops of CALLS calls each."""
    calls, repeat = env_int("CALLS", 3000), env_int("REPEAT", 3)
    got: dict[str, list[float]] = {}
    for _ in range(repeat):
        for name, call in _CALLS.items():
            loop = psycopg.sql.SQL(_LOOP).format(call=psycopg.sql.SQL(call))
            await conn.execute(loop)
            started = time.perf_counter()
            await conn.execute("select pg_temp.calls(%s)", [calls])
            got.setdefault(name, []).append(round((time.perf_counter() - started) * 1e6 / calls, 1))
            await conn.execute("drop function pg_temp.calls(integer)")
    for name, values in got.items():
        progress(f"{name}: {values} us a call")
    return got


async def run() -> dict[str, Any]:
    rounds, warmup = env_int("ROUNDS", 300), env_int("WARMUP", 50)
    tmp = Path(tempfile.mkdtemp(prefix="pgleader-bench-"))
    os.chmod(tmp, 0o755)  # the postgres user must reach its data dir
    server = EmbeddedPostgres(tmp / "pg")
    dsn = server.start()
    try:
        await migrate(dsn)
        others = []
        for name in ("b", "c"):  # followers a hold-back looks at
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            await conn.execute(QUERIES["join_election"], ["bench", name, "h", 1, "0", True, 0])
            others.append(conn)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute(
                QUERIES["join_election"], ["bench", "a", "h", os.getpid(), "0", True, 0]
            )
            assert await cur.fetchone() is not None
            await conn.execute(QUERIES["rehearse_claim"], ["bench", "a", "h", 6])
            await conn.execute(_BARE_TABLE)
            await conn.execute(_BARE_ROW)
            claims: list[float] = []
            bare: list[float] = []
            for n in range(rounds):
                started = time.perf_counter()
                # the lock is this session's after the first: granted at once (re-entrant)
                cur = await conn.execute(QUERIES["campaign"], ["bench", "a", "h", True, 6])
                await cur.fetchall()
                claims.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                await (await conn.execute(_BARE_BUMP)).fetchall()
                await (await conn.execute(_BARE_NOTIFY)).fetchall()
                bare.append((time.perf_counter() - started) * 1000)
                if (n + 1) % 100 == 0:
                    progress(f"round {n + 1}/{rounds}")
            per_call = await _per_call(conn)
        for other in others:
            await other.close()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    claim_ms, bare_ms = summary(claims[warmup:]), summary(bare[warmup:])
    difference = statistics.median(claims[warmup:]) - statistics.median(bare[warmup:])
    return {
        "benchmark": "claim_cost",
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "method": __doc__,
        "rounds": rounds - warmup,
        "claim_ms": claim_ms,
        "bare_bump_and_notify_ms": bare_ms,
        "p50_difference_ms": round(difference, 3),
        "us_per_call": per_call,
    }


def main() -> int:
    return run_main(run, "claim_cost")


if __name__ == "__main__":
    raise SystemExit(main())
