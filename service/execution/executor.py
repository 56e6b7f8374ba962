"""The fenced executor: claim under the epoch, call the broker after commit, record.

Signals are executed in batches, three statements a batch whatever its size:

    claim   gateway.claim_signals: one statement, fenced by pgleader.check_epoch
            (election row FOR SHARE, epoch must be ours), pending -> executing,
            an order booked per signal
    send    only after the claim committed, and only while our lease holds:
            broker.place_many
    record  gateway.complete_orders (executed/failed, positions)

A batch starts as soon as a signal arrives, provided fewer than `concurrency`
batches are in flight and, under load (the last batch carried more than one
signal), the last one started at least `batch_interval` ago; what arrives
meanwhile waits and goes out together in the next one. At a trickle every signal
is its own batch, at once; under load batches grow, so the database does less
work per signal exactly when it matters (each statement, each commit has a fixed
cost that a batch pays once).

A signal left 'executing' (we crashed, the broker did not answer, we lost the
lease) is reconciled, never re-sent blindly: the broker is asked whether it got
the order's client id; yes -> executed, no -> back to pending, cannot tell ->
in_doubt with an alert. Claims of an older epoch are reconciled only once that
leader's lease has surely run out, so it cannot still be sending; our own only
once a send of theirs must have ended (broker_timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from pgleader import Elector, NotLeader, Transition, fenced_statement
from service.brokers.base import Broker, OrderRequest, OrderResult
from service.errors import BrokerUnavailable
from service.queries import QUERIES

__all__ = ["Executor"]

log = structlog.get_logger("service.execution.executor")

_CLAIM = QUERIES["claim_signals"]
_COMPLETE = QUERIES["complete_orders"]
_PENDING = QUERIES["pending_signals"]
_EXECUTING = QUERIES["executing_signals"]  # ours only once any send of ours must have ended
_MARK_IN_DOUBT = QUERIES["mark_in_doubt"]
_REQUEUE = QUERIES["requeue_signal"]


@dataclass(frozen=True, slots=True)
class _Sent:
    signal_id: int
    order: OrderRequest


class Executor:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        elector: Elector,
        broker: Broker,
        *,
        max_age: timedelta,
        broker_timeout: float = 5.0,
        batch_size: int = 200,
        concurrency: int = 1,
        batch_interval: float = 0.005,
        lookup_attempts: int = 3,
    ) -> None:
        if batch_size < 1 or concurrency < 1:
            raise ValueError("batch_size and concurrency must be at least 1")
        self.pool = pool
        self.elector = elector
        self.broker = broker
        self.max_age = max_age
        self.broker_timeout = broker_timeout
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.batch_interval = batch_interval
        self._last_batch_at = float("-inf")
        self._last_batch_size = 0
        self._dispatch_later: asyncio.TimerHandle | None = None
        self.lookup_attempts = lookup_attempts
        self.instance_id = elector.instance_id
        # Every signal queued or in a batch in this process, with the future of its
        # status: a second request for it (inline + NOTIFY + sweep) joins the first,
        # and reconciliation leaves it alone.
        self._running: dict[int, asyncio.Future[str]] = {}
        self._waiting: deque[int] = deque()
        self._batches: set[asyncio.Task[None]] = set()
        self._lookup_failures: dict[str, int] = {}
        # Older epochs' claims may be reconciled only after their leader's lease ran out.
        self._reconcile_older_after = float("inf")
        self.counts = {"executed": 0, "failed": 0, "expired": 0, "rejected": 0, "fenced": 0}
        self.batch_stats = {"batches": 0, "signals": 0, "largest": 0}
        elector.on_transition(self._on_transition)

    # -- life cycle -----------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Signals waiting for a batch slot (not counting those in flight)."""
        return len(self._waiting)

    async def drain(self, timeout: float) -> None:
        """Let executions in progress and queued finish (a broker call is never
        abandoned midway), for at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self._batches or self._waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._batches:
                await asyncio.wait(list(self._batches), timeout=remaining)
            else:  # the next batch waits for batch_interval: its timer is set
                await asyncio.sleep(min(self.batch_interval, remaining))

    async def stop(self) -> None:
        self._waiting.clear()
        if self._dispatch_later is not None:
            self._dispatch_later.cancel()
            self._dispatch_later = None
        for task in list(self._batches):
            task.cancel()
        for task in list(self._batches):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for future in self._running.values():  # never dispatched: the sweep has them
            if not future.done():
                future.set_result("pending")

    def _on_transition(self, t: Transition) -> None:
        if t.kind == "elected":
            # The old leader stops sending when its lease ends; a call it started
            # just before may take up to broker_timeout (orders carry that deadline).
            timings = self.elector.timings
            wait = timings.lease + self.broker_timeout + timings.heartbeat
            self._reconcile_older_after = time.monotonic() + wait

    # -- submitting work ------------------------------------------------------

    def enqueue(self, ids: Iterable[int]) -> None:
        """Queue signals (from NOTIFY, the sweep, reconciliation). Leader only: a
        follower drops them, the leader has its own copy of the work."""
        if not self.elector.is_leader:
            return
        for signal_id in ids:
            self._submit(signal_id)
        self._dispatch()

    async def execute(self, signal_id: int) -> str:
        """Execute one signal if it is pending; returns its status afterwards.

        'not_leader' when this instance may not act (then nothing was claimed);
        'executing' when the broker's answer is not recorded (yet); 'pending' when
        it could not be claimed now (the sweep retries).
        """
        future = self._submit(signal_id)
        self._dispatch()
        return await asyncio.shield(future)

    def _submit(self, signal_id: int) -> asyncio.Future[str]:
        future = self._running.get(signal_id)
        if future is None or future.done():  # done: its answer is stale, ask again
            future = asyncio.get_running_loop().create_future()
            self._running[signal_id] = future
            self._waiting.append(signal_id)
            future.add_done_callback(lambda f: self._forget(signal_id, f))
        return future

    def _forget(self, signal_id: int, future: asyncio.Future[str]) -> None:
        if self._running.get(signal_id) is future:
            del self._running[signal_id]

    def _dispatch(self) -> None:
        while self._waiting and len(self._batches) < self.concurrency:
            wait = self._last_batch_at + self.batch_interval - time.monotonic()
            if wait > 0 and self._last_batch_size > 1:  # under load: let a batch gather
                if self._dispatch_later is None:
                    loop = asyncio.get_running_loop()
                    self._dispatch_later = loop.call_later(wait, self._dispatch_on_time)
                return
            self._last_batch_at = time.monotonic()
            size = self._last_batch_size = min(len(self._waiting), self.batch_size)
            ids = [self._waiting.popleft() for _ in range(size)]
            task = asyncio.create_task(self._run_batch(ids), name="executor-batch")
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _dispatch_on_time(self) -> None:
        self._dispatch_later = None
        self._dispatch()

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._dispatch()

    # -- one batch ------------------------------------------------------------

    async def _run_batch(self, ids: list[int]) -> None:
        stats = self.batch_stats
        stats["batches"] += 1
        stats["signals"] += len(ids)
        stats["largest"] = max(stats["largest"], len(ids))
        status: dict[int, str] = {}
        try:
            await self._execute_batch(ids, status)
        except Exception:
            log.exception("batch failed; sweep and reconciliation settle it", signals=len(ids))
        finally:
            for signal_id in ids:
                future = self._running.get(signal_id)
                if future is not None and not future.done():
                    future.set_result(status.get(signal_id, "pending"))

    async def _execute_batch(self, ids: list[int], status: dict[int, str]) -> None:
        """Claim, send, record; `status` is kept up to date as the batch goes."""
        try:
            claimed = await self._claim(ids, status)
        except NotLeader:
            self.counts["fenced"] += len(ids)
            status.update((signal_id, "not_leader") for signal_id in ids)
            return
        if not claimed:
            return
        if not self.elector.is_leader:
            # Our lease ran out after the claim: do not send; the next leader reconciles.
            return
        orders = [sent.order for sent in claimed]
        try:
            async with asyncio.timeout(self.broker_timeout):
                answers = await self.broker.place_many(orders)
        except TimeoutError:
            answers = [BrokerUnavailable("no answer within broker_timeout")] * len(orders)
        done: list[tuple[str, OrderResult]] = []
        for sent, answer in zip(claimed, answers, strict=True):
            if isinstance(answer, OrderResult):
                done.append((sent.order.client_order_id, answer))
            else:
                log.error(
                    "broker outcome unknown; will reconcile",
                    signal_id=sent.signal_id,
                    error=str(answer),
                )
        recorded = await self._complete(done)
        for sent in claimed:
            final = recorded.get(sent.order.client_order_id)
            if final is not None:
                status[sent.signal_id] = final
                self.counts["executed" if final == "executed" else "failed"] += 1

    async def _claim(self, ids: list[int], status: dict[int, str]) -> list[_Sent]:
        """Claim what is pending among `ids`; raises NotLeader (Fenced) for a stale epoch."""
        epoch = self.elector.require_epoch()
        args = [self.elector.election, epoch, ids, self.instance_id, self.broker.name]
        with fenced_statement(self.elector.election, epoch):
            async with self.pool.connection() as conn:
                cur = await conn.execute(_CLAIM, [*args, self.max_age])
                rows = await cur.fetchall()
        valid_until = datetime.now(UTC) + timedelta(seconds=self.broker_timeout)
        claimed = []
        for signal_id, acted, state, coid, instrument, action, quantity, price in rows:
            status[signal_id] = state or "unknown"
            if not acted:
                continue
            if coid is None:  # ended now without an order: expired or rejected
                self.counts[state] = self.counts.get(state, 0) + 1
                log.warning("signal not executed", signal_id=signal_id, status=state)
                continue
            order = OrderRequest(
                coid, instrument, action, quantity, price, epoch, self.instance_id, valid_until
            )
            claimed.append(_Sent(signal_id, order))
        return claimed

    async def _complete(self, done: Sequence[tuple[str, OrderResult]]) -> dict[str, str]:
        """Record the broker's answers, by client order id; returns each recorded
        order's signal status (an unknown client order id is left out)."""
        if not done:
            return {}
        columns: list[list[str | None]] = [[], [], [], []]
        for client_order_id, result in done:
            outcome = "filled" if result.status == "filled" else "rejected"
            row = (client_order_id, outcome, result.broker_order_id, result.detail)
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(_COMPLETE, columns)
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            # The orders went out; recording failed. Reconciliation records them later.
            log.error(
                "orders sent but not recorded; will reconcile", orders=len(done), error=str(exc)
            )
            return {}
        # A null status: no such order (cannot happen for ours); leave it to reconciliation.
        return {str(coid): str(state) for coid, state in rows if state is not None}

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
        grace = timedelta(seconds=self.broker_timeout)
        async with self.pool.connection() as conn:
            cur = await conn.execute(_EXECUTING, {"epoch": epoch, "grace": grace, "limit": limit})
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
                    _MARK_IN_DOUBT,
                    [client_order_id, f"broker cannot tell whether it got the order: {exc}"],
                )
            self._lookup_failures.pop(client_order_id, None)
            log.critical("signal in doubt", signal_id=signal_id, coid=client_order_id)
            return 1
        self._lookup_failures.pop(client_order_id, None)
        if found is not None:
            result = OrderResult(found.broker_order_id, found.status, "reconciled")
            recorded = await self._complete([(client_order_id, result)])
            if client_order_id not in recorded:
                return 0
            log.warning("reconciled: the broker had the order", signal_id=signal_id)
            return 1
        try:
            async with self.pool.connection() as conn, conn.transaction():
                await self.elector.fence(conn)
                await conn.execute(_REQUEUE, [client_order_id])
        except NotLeader:
            return 0
        log.warning("reconciled: the broker never got the order; requeued", signal_id=signal_id)
        self.enqueue([signal_id])
        return 1
