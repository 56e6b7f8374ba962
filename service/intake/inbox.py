"""The signal inbox: store signals once (by fingerprint), read them back.

Storing is group-committed: the signals of concurrent requests go into the
database together, in one statement and one commit (`Inbox.store`). At a
trickle each signal is written at once, alone; while a write is in flight, what
arrives waits for it and goes in the next, so under load a request pays a
fraction of a statement and of a commit instead of a whole one.

A write also NOTIFYs `gateway_signals` with the new ids (comma-separated, one
notification per write), delivered on commit, so the leader wakes up even when
another instance received them. The leader storing a signal it executes at
once skips that NOTIFY (it would only come back to itself); if it then cannot
execute it, it sends the NOTIFY after all (`notify_signal`), so a successor
hears of the signal without waiting for a sweep.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from pgleader.metrics import Histogram
from service.intake.group import GroupWriter
from service.intake.signals import Signal
from service.queries import QUERIES

__all__ = [
    "NOTIFY_CHANNEL",
    "Inbox",
    "Stored",
    "get_signal",
    "notify_signal",
    "parse_notification",
    "store_signals",
]

NOTIFY_CHANNEL = "gateway_signals"

# What each statement does: sql/gateway/queries.sql.
_INSERT = QUERIES["store_signals"]
_EXISTING = QUERIES["signal_ids_by_fingerprint"]
_NOTIFY = QUERIES["notify_signal"]
_GET = QUERIES["get_signal"]


@dataclass(frozen=True, slots=True)
class Stored:
    signal_id: int
    duplicate: bool


@dataclass(slots=True)
class Incoming:
    """A signal to store: what `store_signals` takes."""

    signal: Signal
    fingerprint: str
    received_at: datetime | None = None  # None: the database's now()
    notify: bool = True


async def store_signals(
    conn: AsyncConnection[Any], items: Sequence[Incoming], received_by: str
) -> list[Stored]:
    """Insert the signals whose fingerprint is new, in one statement (autocommit:
    one commit); returns each item's id, in order. An item whose fingerprint is
    stored already, or earlier in `items`, is a duplicate."""
    # One JSON parameter for the whole write: psycopg adapts one string much faster
    # than eleven arrays. Decimals and times go as text, so nothing is rounded.
    rows = []
    for n, item in enumerate(items):
        s = item.signal
        payload = s.payload()  # price and stop in it are decimal text already
        received_at = None if item.received_at is None else item.received_at.isoformat()
        rows.append(
            {"n": n, "fp": item.fingerprint, "type": s.type.name, "instrument": s.instrument,
             "position": s.position, "side": s.side.value, "lots": s.lots, "price": payload["price"],
             "stop": payload["stop"], "signal_at": s.timestamp.isoformat(),
             "payload": payload, "received_at": received_at, "notify": item.notify}
        )  # fmt: skip
    cur = await conn.execute(_INSERT, {"rows": json.dumps(rows), "received_by": received_by})
    rows = await cur.fetchall()
    missing = [fp for fp, signal_id, _ in rows if signal_id is None]
    found: dict[str, int] = {}
    if missing:  # stored before (a retry), or by a concurrent write that committed first
        cur = await conn.execute(_EXISTING, [missing])
        found = {fp: int(signal_id) for fp, signal_id in await cur.fetchall()}
    result = []
    first: set[str] = set()
    for fp, signal_id, _ in rows:
        new = signal_id is not None and fp not in first
        first.add(fp)
        result.append(Stored(int(signal_id if signal_id is not None else found[fp]), not new))
    return result


def parse_notification(payload: str) -> list[int]:
    """The ids of a `gateway_signals` notification ("12" or "12,13,14"); [] if garbled."""
    try:
        return [int(part) for part in payload.split(",")]
    except ValueError:
        return []


class Inbox:
    """Group commit: `store` waits for the write that carries its signal. One
    write is in flight at a time; what arrives meanwhile goes in the next, up to
    `max_batch` signals a write."""

    def __init__(
        self, pool: AsyncConnectionPool[Any], received_by: str, *, max_batch: int = 200
    ) -> None:
        self.pool = pool
        self.received_by = received_by
        self.max_batch = max_batch
        self._group: GroupWriter[Incoming, Stored] = GroupWriter(
            self._write, cap=max_batch, name="inbox-writer",
            stopped=lambda: RuntimeError("inbox writer stopped"),
        )  # fmt: skip
        self.stats = {"writes": 0, "signals": 0, "largest": 0}
        # How long a write takes to commit: most of it is the WAL flush, so a slow or
        # stalling disk shows here first (every answer waits for its write).
        self.write_seconds = Histogram((0.005, 0.025, 0.1, 0.5, 2.5))

    async def store(
        self,
        signal: Signal,
        fingerprint: str,
        received_at: datetime | None = None,
        *,
        notify: bool = True,
    ) -> Stored:
        """Store one signal; raises what the write raised (the database is
        unreachable: psycopg.OperationalError or PoolTimeout) and then nothing of it
        was stored by this call."""
        return await self._group.submit(Incoming(signal, fingerprint, received_at, notify))

    async def close(self) -> None:
        """Wait for the writes under way (new ones still start: call after the
        HTTP server stopped taking requests)."""
        await self._group.close()

    async def _write(self, items: list[Incoming]) -> list[Stored]:
        """One write of a group: what it raises is every signal's outcome."""
        stats = self.stats
        stats["writes"] += 1
        stats["signals"] += len(items)
        stats["largest"] = max(stats["largest"], len(items))
        try:
            return await self._store(items)
        except psycopg.OperationalError:
            # A pooled connection may have died with a database restart: one fresh try.
            return await self._store(items)

    async def _store(self, items: list[Incoming]) -> list[Stored]:
        async with self.pool.connection() as conn:
            started = time.perf_counter()
            stored = await store_signals(conn, items, self.received_by)
            self.write_seconds.observe(time.perf_counter() - started)
        return stored


async def notify_signal(conn: AsyncConnection[Any], signal_id: int) -> None:
    await conn.execute(_NOTIFY, [NOTIFY_CHANNEL, str(signal_id)])


async def get_signal(conn: AsyncConnection[Any], signal_id: int) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_GET, [signal_id])
        return await cur.fetchone()
