"""The leader's housekeeping jobs: retention, statistics, stale instances.

Each is a small class with `async run(run: JobRun) -> str` for pgleader's job
runner (pgleader/jobs.py); every write is fenced by the run's epoch.

- `Retention` deletes terminal signals older than `PGLEADER_RETENTION_DAYS` in
  short batches, each its own transaction, never one pending, executing, in doubt or
  awaiting approval,
  and never one an open position refers to. Orders, positions, alerts and
  reconciliations are the trading record: they stay (their reference to the signal
  becomes null; an order keeps its instrument, side, lots, symbol and times).
  Trading comes first: a batch holds the election row (its fence) while it runs,
  so its size adapts to stay near 20 ms, and after each batch the job rests nine
  times as long as the batch took (at most a tenth of one core on deleting: the
  write bursts of a delete, its WAL and the dirty pages a checkpoint must flush,
  are what slows the webhook's commits, so they are kept small and spread). A
  run stops after 25 minutes with the rest left for the next hourly run: a backlog
  of millions of rows (retention switched on late) is worked off over a few runs.
- `Statistics` refreshes `gateway.portfolio_state.statistics`.
- `PruneInstances` drops instances not seen for a while from the registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from pgleader.jobs import JobRun
from pgleader.queries import QUERIES as LIBRARY_QUERIES
from service.brokers.base import Instrument
from service.queries import QUERIES

__all__ = ["PruneInstances", "Retention", "Statistics"]

_DELETE = QUERIES["delete_old_signals"]
_COMPUTE = QUERIES["compute_statistics"]
_STORE = QUERIES["store_statistics"]
_PRUNE = LIBRARY_QUERIES["prune_instances"]
_PRUNE_SETTINGS = QUERIES["prune_instance_settings"]


class Retention:
    """The `retention` job; see the module's docstring for its throttle."""

    TARGET_BATCH_S = 0.02
    MIN_BATCH, MAX_BATCH = 50, 2000

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        days: int,
        batch: int = 500,
        duty: float = 0.10,
        budget: float = 1500.0,
    ) -> None:
        self.pool, self.days, self.batch = pool, days, batch
        self.duty, self.budget = duty, budget

    async def run(self, run: JobRun) -> str:
        if self.days <= 0:
            return "retention off (PGLEADER_RETENTION_DAYS=0): nothing deleted"
        clock = asyncio.get_running_loop().time
        began, deleted, batch = clock(), 0, self.batch
        while True:
            at = clock()
            async with self.pool.connection() as conn:
                with run.fenced():
                    cur = await conn.execute(
                        _DELETE, [run.election, run.epoch, self.days * 86400.0, batch]
                    )
                    row = await cur.fetchone()
            took = clock() - at
            count = int(row[0]) if row else 0
            deleted += count
            if count < batch:
                return f"{deleted} signal(s) older than {self.days} day(s) deleted"
            if clock() - began >= self.budget:
                return (
                    f"{deleted} signal(s) older than {self.days} day(s) deleted; more remain"
                    f" (a run deletes for {self.budget:.0f} s at most): the next run goes on"
                )
            batch = self._next_batch(batch, took)
            await asyncio.sleep(max(0.01, took * (1 - self.duty) / self.duty))

    def _next_batch(self, batch: int, took: float) -> int:
        """The batch size that would have taken about TARGET_BATCH_S, within bounds and
        at most doubling (one slow batch must not make the next one tiny for long)."""
        wanted = batch * self.TARGET_BATCH_S / max(took, 1e-3)
        return int(min(self.MAX_BATCH, 2 * batch, max(self.MIN_BATCH, wanted)))


class Statistics:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        instruments: Mapping[str, Instrument] | None,
        days: int = 30,
    ) -> None:
        self.pool, self.instruments, self.days = pool, instruments, days

    async def run(self, run: JobRun) -> str:
        async with self.pool.connection() as conn:
            cur = await conn.execute(_COMPUTE, [run.election, self.days])
            row = await cur.fetchone()
            statistics: dict[str, Any] = dict(row[0]) if row and row[0] else {}
            statistics["realised_pnl"] = self._realised(statistics.get("closed_by_instrument", []))
            statistics["history_days"] = self.days
            with run.fenced():
                await conn.execute(
                    _STORE, [run.election, run.epoch, run.instance_id, Jsonb(statistics)]
                )
        open_positions = len(statistics.get("open_positions", []))
        return f"statistics refreshed: {open_positions} open position(s)"

    def _realised(self, closed: list[dict[str, Any]]) -> dict[str, Any]:
        """Realised P&L at the signals' prices (TradingView's, not the broker's fills):
        points x lots x lot size, by instrument; None where the lot size is unknown."""
        by_instrument: dict[str, Any] = {}
        for item in closed:
            points = item.get("points_x_lots")
            if points is None:
                continue
            spec = (self.instruments or {}).get(item["instrument"])
            lot_size = spec.lot_size if spec else (1 if self.instruments is None else None)
            value = None if lot_size is None else Decimal(str(points)) * lot_size
            previous = by_instrument.get(item["instrument"], Decimal(0))
            by_instrument[item["instrument"]] = (
                None if value is None or previous is None else previous + value
            )
        return {
            "basis": "signal prices",
            "by_instrument": {k: None if v is None else str(v) for k, v in by_instrument.items()},
        }


class PruneInstances:
    def __init__(self, pool: AsyncConnectionPool[Any], after: float) -> None:
        self.pool, self.after = pool, after

    async def run(self, run: JobRun) -> str:
        async with self.pool.connection() as conn, conn.transaction():
            with run.fenced():
                cur = await conn.execute(_PRUNE, [run.election, run.epoch, self.after])
                gone = [r[0] for r in await cur.fetchall()]
                if gone:
                    await conn.execute(_PRUNE_SETTINGS, [run.election, run.epoch, gone])
        if not gone:
            return "no stale instance"
        return f"{len(gone)} stale instance(s) removed: {', '.join(sorted(gone))[:300]}"
