"""The fenced executor: claim under the epoch, call the broker after commit, record.

    claim   one transaction: pgleader fence (election row FOR SHARE, epoch must be
            ours) + gateway.claim_signal (pending -> executing, order booked)
    send    only after the claim committed, and only while our lease holds
    record  gateway.complete_order (executed/failed, positions)

A signal left 'executing' (we crashed, the broker did not answer, we lost the
lease) is reconciled, never re-sent blindly: the broker is asked whether it got
the order's client id; yes -> executed, no -> back to pending, cannot tell ->
in_doubt with an alert. Claims of an older epoch are reconciled only once that
leader's lease has surely run out, so it cannot still be sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from pgleader import Elector, NotLeader, Transition
from service.brokers import Broker, BrokerUnavailable, OrderRequest

__all__ = ["Executor"]

log = structlog.get_logger("service.execution")

_CLAIM = (
    "select status, client_order_id, instrument, action, quantity, price"
    " from gateway.claim_signal(%s, %s, %s, %s, %s)"
)
_COMPLETE = "select gateway.complete_order(%s, %s, %s, %s)"
_PENDING = "select id from gateway.signals where status = 'pending' order by received_at limit %s"
_EXECUTING = (
    "select signal_id, claimed_epoch, client_order_id from gateway.executing"
    " order by claimed_at limit %s"
)
_STATUS = "select status from gateway.signals where id = %s"


@dataclass(frozen=True, slots=True)
class _Claim:
    signal_id: int
    status: str
    order: OrderRequest | None


class Executor:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        elector: Elector,
        broker: Broker,
        *,
        max_age: timedelta,
        broker_timeout: float = 5.0,
        workers: int = 4,
        lookup_attempts: int = 3,
    ) -> None:
        self.pool = pool
        self.elector = elector
        self.broker = broker
        self.max_age = max_age
        self.broker_timeout = broker_timeout
        self.lookup_attempts = lookup_attempts
        self.instance_id = elector.instance_id
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._queued: set[int] = set()
        # Executions in progress in this process, by signal: a second request for the
        # same signal (inline + NOTIFY) joins the first; reconciliation leaves them alone.
        self._running: dict[int, asyncio.Task[str]] = {}
        self._lookup_failures: dict[str, int] = {}
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        # Older epochs' claims may be reconciled only after their leader's lease ran out.
        self._reconcile_older_after = float("inf")
        self.counts = {"executed": 0, "failed": 0, "expired": 0, "rejected": 0, "fenced": 0}
        elector.on_transition(self._on_transition)

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"executor-{n}") for n in range(self._workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def drain(self, timeout: float) -> None:
        """Let executions in progress finish (a broker call is never abandoned midway)."""
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=timeout)

    def _on_transition(self, t: Transition) -> None:
        if t.kind == "elected":
            # The old leader stops sending when its lease ends; a call it started
            # just before may take up to broker_timeout (orders carry that deadline).
            timings = self.elector.timings
            wait = timings.lease + self.broker_timeout + timings.heartbeat
            self._reconcile_older_after = time.monotonic() + wait

    def enqueue(self, ids: Iterable[int]) -> None:
        for signal_id in ids:
            if signal_id not in self._queued:
                self._queued.add(signal_id)
                self._queue.put_nowait(signal_id)

    async def _work(self) -> None:
        while True:
            signal_id = await self._queue.get()
            self._queued.discard(signal_id)
            if not self.elector.is_leader:
                continue  # the leader has its own copy of the work (NOTIFY + sweep)
            try:
                await self.execute(signal_id)
            except Exception:
                log.exception("execution failed; the sweep will retry", signal_id=signal_id)

    # -- one signal -----------------------------------------------------------

    async def execute(self, signal_id: int) -> str:
        """Execute one signal if it is pending; returns its status afterwards.

        'not_leader' when this instance may not act (then nothing was claimed).
        """
        task = self._running.get(signal_id)
        if task is None:
            task = asyncio.create_task(self._execute(signal_id))
            self._running[signal_id] = task
            task.add_done_callback(lambda _: self._running.pop(signal_id, None))
        return await asyncio.shield(task)

    async def _execute(self, signal_id: int) -> str:
        try:
            claim = await self._claim(signal_id)
        except NotLeader:
            self.counts["fenced"] += 1
            return "not_leader"
        if claim is None:
            return await self._status(signal_id)
        if claim.order is None:
            self.counts[claim.status] = self.counts.get(claim.status, 0) + 1
            log.warning("signal not executed", signal_id=signal_id, status=claim.status)
            return claim.status
        return await self._send(claim.signal_id, claim.order)

    async def _claim(self, signal_id: int) -> _Claim | None:
        async with self.pool.connection() as conn, conn.transaction():
            epoch = await self.elector.fence(conn)
            cur = await conn.execute(
                _CLAIM, [signal_id, epoch, self.instance_id, self.broker.name, self.max_age]
            )
            row = await cur.fetchone()
        if row is None:
            return None
        status, client_order_id, instrument, action, quantity, price = row
        if status != "executing":
            return _Claim(signal_id, status, None)
        valid_until = datetime.now(UTC) + timedelta(seconds=self.broker_timeout)
        order = OrderRequest(
            client_order_id,
            instrument,
            action,
            quantity,
            price,
            epoch,
            self.instance_id,
            valid_until,
        )
        return _Claim(signal_id, status, order)

    async def _send(self, signal_id: int, order: OrderRequest) -> str:
        if not self.elector.is_leader:
            # Our lease ran out after the claim: do not send; the next leader reconciles.
            return "executing"
        try:
            result = await asyncio.wait_for(self.broker.place(order), self.broker_timeout)
        except (BrokerUnavailable, TimeoutError) as exc:
            log.error("broker outcome unknown; will reconcile", signal_id=signal_id, error=str(exc))
            return "executing"
        outcome = "filled" if result.status == "filled" else "rejected"
        status = await self._complete(
            order.client_order_id, outcome, result.broker_order_id, result.detail
        )
        self.counts["executed" if status == "executed" else "failed"] += 1
        return status

    async def _complete(
        self, client_order_id: str, outcome: str, broker_order_id: str | None, detail: str | None
    ) -> str:
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    _COMPLETE, [client_order_id, outcome, broker_order_id, detail]
                )
                row = await cur.fetchone()
        except psycopg.Error as exc:
            # The order went out; recording failed. Reconciliation records it later.
            log.error(
                "order sent but not recorded; will reconcile", coid=client_order_id, error=str(exc)
            )
            return "executing"
        assert row is not None
        return str(row[0])

    async def _status(self, signal_id: int) -> str:
        async with self.pool.connection() as conn:
            cur = await conn.execute(_STATUS, [signal_id])
            row = await cur.fetchone()
        return "unknown" if row is None else str(row[0])

    # -- the safety net -------------------------------------------------------

    async def sweep(self, limit: int = 1000) -> int:
        """Queue pending signals (the NOTIFY may have been missed). Leader only."""
        if not self.elector.is_leader:
            return 0
        async with self.pool.connection() as conn:
            cur = await conn.execute(_PENDING, [limit])
            ids = [int(r[0]) for r in await cur.fetchall()]
        self.enqueue(ids)
        return len(ids)

    async def reconcile(self, limit: int = 100) -> int:
        """Settle signals left 'executing' by asking the broker. Leader only."""
        epoch = self.elector.epoch
        if epoch is None:
            return 0
        async with self.pool.connection() as conn:
            cur = await conn.execute(_EXECUTING, [limit])
            rows = await cur.fetchall()
        settled = 0
        for signal_id, claimed_epoch, client_order_id in rows:
            if signal_id in self._running:
                continue
            if claimed_epoch < epoch and time.monotonic() < self._reconcile_older_after:
                continue
            if claimed_epoch > epoch:
                continue
            settled += await self._reconcile_one(signal_id, client_order_id)
        return settled

    async def _reconcile_one(self, signal_id: int, client_order_id: str) -> int:
        try:
            found = await asyncio.wait_for(self.broker.lookup(client_order_id), self.broker_timeout)
        except (BrokerUnavailable, TimeoutError) as exc:
            failures = self._lookup_failures.get(client_order_id, 0) + 1
            self._lookup_failures[client_order_id] = failures
            if failures < self.lookup_attempts:
                return 0
            async with self.pool.connection() as conn:
                await conn.execute(
                    "select gateway.mark_in_doubt(%s, %s)",
                    [client_order_id, f"broker cannot tell whether it got the order: {exc}"],
                )
            self._lookup_failures.pop(client_order_id, None)
            log.critical("signal in doubt", signal_id=signal_id, coid=client_order_id)
            return 1
        self._lookup_failures.pop(client_order_id, None)
        if found is not None:
            outcome = "filled" if found.status == "filled" else "rejected"
            await self._complete(client_order_id, outcome, found.broker_order_id, "reconciled")
            log.warning("reconciled: the broker had the order", signal_id=signal_id)
            return 1
        try:
            async with self.pool.connection() as conn, conn.transaction():
                await self.elector.fence(conn)
                await conn.execute("select gateway.requeue_signal(%s)", [client_order_id])
        except NotLeader:
            return 0
        log.warning("reconciled: the broker never got the order; requeued", signal_id=signal_id)
        self.enqueue([signal_id])
        return 1
