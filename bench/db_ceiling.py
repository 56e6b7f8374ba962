"""The database-part ceiling: a plain psycopg loop storing and finishing distinct
signals as fast as a few connections can, with no HTTP, election or fencing.

Per signal, two autocommit statements on a copy of gateway.signals (same
columns, constraints and indexes, in a throwaway schema):

    insert ... on conflict (fingerprint) do nothing returning id
    update ... set status = 'executed', claimed_epoch = 1, ... where id = $id

The gateway does more per signal (NOTIFY, the fenced claim, the order row, the
paper broker's row, the position): this is an upper bound, not a like-for-like.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg

from bench.procstat import postgres_cpu_seconds

__all__ = ["db_ceiling"]

_SETUP = """
drop schema if exists bench_ceiling cascade;
create schema bench_ceiling;
create table bench_ceiling.signals (like gateway.signals including all);
"""
_INSERT = """
insert into bench_ceiling.signals
    (fingerprint, type, instrument, position, lots, price, stop, signal_at, payload, received_by)
values (%s, 'BASE_ENTRY', 'BANK_NIFTY', %s, 1, 52000.5, 51500, now(), %s, 'db-loop')
on conflict (fingerprint) do nothing
returning id
"""
_FINISH = """
update bench_ceiling.signals
   set status = 'executed', claimed_epoch = 1, claimed_by = 'db-loop', claimed_at = now(),
       finished_at = now(), updated_at = now()
 where id = %s
"""


async def db_ceiling(
    dsn: str, duration: float, connections: int = 4, postmaster: int | None = None
) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        await admin.execute(_SETUP)
    payload = json.dumps({"type": "BASE_ENTRY", "instrument": "BANK_NIFTY", "lots": 1})
    conns = [
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(connections)
    ]
    done = [0] * connections
    deadline = time.monotonic() + duration

    async def worker(n: int, conn: psycopg.AsyncConnection[Any]) -> None:
        i = 0
        while time.monotonic() < deadline:
            label = f"db{n}_{i}"
            cur = await conn.execute(_INSERT, [label, label, payload])
            row = await cur.fetchone()
            if row is not None:
                await conn.execute(_FINISH, [row[0]])
                done[n] += 1
            i += 1

    pg0 = postgres_cpu_seconds(postmaster) if postmaster else None
    began = time.monotonic()
    cpu0 = time.process_time()
    try:
        await asyncio.gather(*(worker(n, c) for n, c in enumerate(conns)))
        wall = time.monotonic() - began
        # Before closing: an exiting backend's CPU is counted only once it is reaped.
        pg = postgres_cpu_seconds(postmaster) - pg0 if postmaster and pg0 is not None else None
    finally:
        for c in conns:
            await c.close()
    rows = sum(done)
    result: dict[str, Any] = {
        "what": "insert on conflict do nothing + update to executed, distinct rows, autocommit",
        "connections": connections,
        "duration_s": round(wall, 2),
        "rows": rows,
        "rows_per_s": round(rows / wall, 1),
        "client_cpu_s": round(time.process_time() - cpu0, 2),
    }
    if pg is not None:
        result["postgres_cpu_s"] = round(pg, 2)
        result["postgres_cpu_s_per_1000"] = round(pg / rows * 1000, 3) if rows else None
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        await admin.execute("drop schema if exists bench_ceiling cascade")
    return result
