"""The fenced executor: claim under the epoch, check, send after commit, record.

Every order is a target net position of one instrument (service.brokers.base),
and at most one order of an instrument is in flight. A batch is four steps:

    claim   gateway.claim_signals: one statement, fenced by pgleader.check_epoch
            (election row FOR SHARE, epoch must be ours). Per instrument of the
            batch, the first pending signal in execution order moves to
            'executing' with its order booked (start and target from the ledger);
            what is too old, unknown or refused ends with an alert.
    check   the broker's positions: an instrument the broker holds otherwise than
            the ledger says (a manual trade, another strategy) is not sent to, its
            signal in_doubt with a page. A target order would take it over.
    send    only after the claim committed, and only while our lease holds:
            broker.place_many, one order per instrument, side by side
    record  gateway.complete_orders (executed / failed / awaiting_approval, ledger)

A batch starts as soon as a signal arrives, provided fewer than `concurrency`
batches are in flight and, under load, the last one started at least
`batch_interval` ago. What waited behind an instrument's order is queued again
when that order is recorded.

What the broker answered decides the rest. Refused (rate limited, not
authorised): nothing was placed, the signal goes back to pending and sending
pauses for the broker's retry_after. Unknown (timeout, reset, 5xx): the signal
stays 'executing' and is settled after `settle` seconds by asking the broker
(never by re-sending blindly): the position at the target -> executed; at the
start and no order for the instrument since the claim -> pending again (the
same target may go); anything else -> in_doubt with a page. Claims of an older
epoch are settled the same way once that leader's lease has surely run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from pgleader import Elector, NotLeader, Transition, fenced_statement
from pgleader.errors import backoff, first_line
from pgleader.metrics import Histogram
from service.brokers.base import Broker, Instrument, OrderRequest, OrderResult
from service.errors import BrokerModeMismatch, BrokerRefused, BrokerUnavailable
from service.queries import QUERIES

__all__ = ["Executor"]

log = structlog.get_logger("service.execution.executor")

_CLAIM = QUERIES["claim_signals"]
_COMPLETE = QUERIES["complete_orders"]
# Received -> executed, s: tens of milliseconds inline; seconds when queued or paced.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PENDING = QUERIES["pending_signals"]
_PENDING_OF = QUERIES["pending_of_instruments"]
_EXECUTING = QUERIES["executing_signals"]
_MARK_IN_DOUBT = QUERIES["mark_in_doubt"]
_REQUEUE = QUERIES["requeue_signal"]
_RAISE_ALERT = QUERIES["raise_alert"]
_UNKNOWN_ORDERS = QUERIES["unknown_broker_orders"]
_HALT = QUERIES["set_trading_halt"]
_OPEN_CONTRACTS = QUERIES["open_contracts"]

# A broker's clock and ours differ: an order this long before the claim still
# counts as "since the claim" when settling (an order we recorded is not counted;
# one too many of someone else's is safe: in doubt).
_CLOCK_MARGIN = timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class _Claimed:
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
        instruments: Mapping[str, Instrument] | None = None,
        broker_timeout: float = 5.0,
        settle: float = 30.0,
        reorder_window: float = 3.0,
        halt_action: str = "wait",
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
        self.instruments = dict(instruments) if instruments is not None else None
        self._limits_of: tuple[datetime, str | None] | None = None
        self.broker_timeout = broker_timeout
        self.settle = settle
        self.reorder_window = timedelta(seconds=reorder_window)
        self.halt_action = halt_action
        # A batch's orders must all go out within broker_timeout at the broker's rate.
        rate = broker.order_rate
        self.batch_size = (
            batch_size if math.isinf(rate) else max(1, min(batch_size, int(rate * broker_timeout)))
        )
        self.concurrency = concurrency
        self.batch_interval = batch_interval
        self._last_batch_at = float("-inf")
        self._last_batch_size = 0
        self._dispatch_later: asyncio.TimerHandle | None = None
        self._paused_until = 0.0
        self._refusals = 0
        self.lookup_attempts = lookup_attempts
        self.instance_id = elector.instance_id
        # Every signal queued or in a batch in this process, with the future of its
        # status: a second request for it (inline + NOTIFY + sweep) joins the first,
        # and settling leaves it alone.
        self._running: dict[int, asyncio.Future[str]] = {}
        self._waiting: deque[int] = deque()
        # Asked for, waiting behind an order of their instrument: queued again when
        # that order is recorded (or by the sweep), their futures still open.
        self._parked: set[int] = set()
        self._batches: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        # client order id -> (failed questions, since when) while settling it
        self._lookup_failures: dict[str, tuple[int, float]] = {}
        # Older epochs' claims may be settled only after their leader's lease ran out.
        self._reconcile_older_after = float("inf")
        self.counts = {
            "executed": 0, "failed": 0, "expired": 0, "rejected": 0, "fenced": 0,
            "in_doubt": 0, "refused": 0, "awaiting_approval": 0,
        }  # fmt: skip
        self.batch_stats = {"batches": 0, "signals": 0, "largest": 0}
        # Seconds from a signal's arrival (any instance's inbox) to its order recorded.
        self.received_to_executed = Histogram(_LATENCY_BUCKETS)
        elector.on_transition(self._on_transition)

    def instrument(self, name: str) -> Instrument:
        """Where an instrument trades; without an instruments file, its own name.
        A future with a contract rule trades in the contract its position is in, or
        today's (`resolve` picks it)."""
        if self.instruments is None:
            return Instrument(name=name, exchange="", symbol=name, product="")
        return self.instruments[name]

    def contract_today(self, instrument: Instrument, now: datetime | None = None) -> str | None:
        """Where a new position of a future with a contract rule opens now
        (exchange:symbol:product), or None for an instrument of a fixed symbol."""
        rule, calendar = instrument.contract, instrument.calendar
        if rule is None or calendar is None:
            return None
        day = calendar.local_date(now or datetime.now(UTC))
        return _where(instrument.with_symbol(rule.contract_on(calendar, day).symbol))

    async def resolve(self, names: Iterable[str]) -> dict[str, Instrument]:
        """Each instrument where it trades now: a future in the contract of its open
        position, else today's contract."""
        found = {name: self.instrument(name) for name in names}
        if any(i.contract is not None for i in found.values()):
            async with self.pool.connection() as conn:
                cur = await conn.execute(_OPEN_CONTRACTS)
                held = {row[0]: row[3] for row in await cur.fetchall()}
            for name, i in found.items():
                if i.contract is not None:
                    found[name] = i.with_symbol(held.get(name) or self.contract_today(i))
        return found

    def _limits(self) -> str | None:
        """The claim's {instrument: {lot_size, max_lots, contract}} (contract: where a
        new position of a future opens today)."""
        if self.instruments is None:
            return None
        # The day that picks a future's contract is the exchange's: look again each minute.
        minute = datetime.now(UTC).replace(second=0, microsecond=0)
        if self._limits_of is None or self._limits_of[0] != minute:
            limits: dict[str, dict[str, Any]] = {}
            for name, i in self.instruments.items():
                limits[name] = {"lot_size": i.lot_size, "max_lots": i.max_lots}
                if i.contract is not None:
                    limits[name]["contract"] = self.contract_today(i)
            self._limits_of = (minute, json.dumps(limits))
        return self._limits_of[1]

    # -- life cycle -----------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Signals waiting for a batch slot (not counting those in flight)."""
        return len(self._waiting)

    async def drain(self, timeout: float) -> None:
        """Let executions in progress and queued finish (a broker call is never
        abandoned midway), for at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self._batches or (self._waiting and time.monotonic() >= self._paused_until):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._batches:
                await asyncio.wait(list(self._batches), timeout=remaining)
            else:  # the next batch waits for batch_interval: its timer is set
                await asyncio.sleep(min(self.batch_interval, remaining))

    async def stop(self) -> None:
        self._waiting.clear()
        for timer in [self._dispatch_later, *self._timers]:
            if timer is not None:
                timer.cancel()
        self._dispatch_later = None
        self._timers.clear()
        for task in list(self._batches):
            task.cancel()
        for task in list(self._batches):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._parked.clear()
        for future in self._running.values():  # never dispatched: the sweep has them
            if not future.done():
                future.set_result("pending")

    def _on_transition(self, t: Transition) -> None:
        if t.kind == "elected":
            # The old leader stops sending when its lease ends; a call it started
            # just before may take up to broker_timeout (orders carry that deadline).
            timings = self.elector.timings
            wait = timings.lease + 2 * self.broker_timeout + timings.heartbeat
            self._reconcile_older_after = time.monotonic() + wait

    # -- submitting work ------------------------------------------------------

    def enqueue(self, ids: Iterable[int]) -> None:
        """Queue signals (from NOTIFY, the sweep, settling). Leader only: a
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
        it could not be claimed now (it waits behind its instrument, or the kill
        switch holds it: the leader takes it up when it can).
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
        elif signal_id in self._parked:
            self._parked.discard(signal_id)
            self._waiting.append(signal_id)
        return future

    def _forget(self, signal_id: int, future: asyncio.Future[str]) -> None:
        self._parked.discard(signal_id)
        if self._running.get(signal_id) is future:
            del self._running[signal_id]

    def _later(self, delay: float, callback: Any, *args: Any) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def run() -> None:
            self._timers.discard(handle)
            callback(*args)

        handle = loop.call_later(delay, run)
        self._timers.add(handle)

    def _dispatch(self) -> None:
        now = time.monotonic()
        if self._waiting and now < self._paused_until:  # the broker asked us to wait
            if self._dispatch_later is None:
                loop = asyncio.get_running_loop()
                self._dispatch_later = loop.call_later(
                    self._paused_until - now, self._dispatch_on_time
                )
            return
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
        freed: set[str] = set()
        try:
            await self._execute_batch(ids, status, freed)
        except Exception:
            log.exception("batch failed; sweep and settling take it up", signals=len(ids))
        finally:
            for signal_id in {*ids, *status}:
                future = self._running.get(signal_id)
                if future is None or future.done():
                    continue
                if signal_id in status or not self.elector.is_leader:
                    future.set_result(status.get(signal_id, "pending"))
                else:  # behind its instrument's order
                    self._parked.add(signal_id)
        if freed:  # what waited behind these instruments' orders goes next
            try:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(_PENDING_OF, [sorted(freed)])
                    self.enqueue(int(r[0]) for r in await cur.fetchall())
            except psycopg.Error as exc:
                log.warning("queueing what waited failed; the sweep will", error=first_line(exc))

    async def _execute_batch(self, ids: list[int], status: dict[int, str], freed: set[str]) -> None:
        """Claim, check, send, record; `status` is kept up to date as the batch
        goes, `freed` gets the instruments whose order is over."""
        try:
            claimed = await self._claim(ids, status)
        except NotLeader:
            self.counts["fenced"] += len(ids)
            status.update((signal_id, "not_leader") for signal_id in ids)
            return
        if not claimed or not self.elector.is_leader:
            # Our lease ran out after the claim: do not send; the next leader settles.
            return
        claimed = await self._check_positions(claimed, status, freed)
        if not claimed or not self.elector.is_leader:
            return
        budget = self._send_budget(len(claimed))
        if math.isinf(self.broker.order_rate):  # one request for the batch
            await self._send(claimed, budget, status, freed)
        else:  # paced: each order recorded (and answered inline) as soon as it is done
            await asyncio.gather(*(self._send([c], budget, status, freed) for c in claimed))

    async def _send(
        self, claimed: list[_Claimed], budget: float, status: dict[int, str], freed: set[str]
    ) -> None:
        orders = [c.order for c in claimed]
        try:
            async with asyncio.timeout(budget):
                answers = await self.broker.place_many(orders)
        except TimeoutError:
            answers = [BrokerUnavailable("no answer within broker_timeout")] * len(orders)
        done: list[tuple[OrderRequest, OrderResult]] = []
        for c, answer in zip(claimed, answers, strict=True):
            if isinstance(answer, OrderResult):
                done.append((c.order, answer))
            elif isinstance(answer, BrokerRefused):
                await self._refused(c, answer, status, freed)
            elif isinstance(answer, BrokerModeMismatch):
                await self._mode_mismatch(c, answer, status, freed)
            else:
                log.error(
                    "broker outcome unknown; settled later",
                    signal_id=c.signal_id,
                    instrument=c.order.instrument.name,
                    error=str(answer),
                )
        recorded = await self._complete(done)
        for c in claimed:
            final = recorded.get(c.order.client_order_id)
            if final is not None:
                status[c.signal_id] = final
                freed.add(c.order.instrument.name)
                self.counts[final if final in self.counts else "failed"] += 1
                future = self._running.get(c.signal_id)
                if future is not None and not future.done():
                    future.set_result(final)

    def _send_budget(self, orders: int) -> float:
        rate = self.broker.order_rate
        return self.broker_timeout + (0.0 if math.isinf(rate) else orders / rate)

    async def _claim(self, ids: list[int], status: dict[int, str]) -> list[_Claimed]:
        """Claim the instruments of `ids`; raises NotLeader (Fenced) for a stale epoch."""
        epoch = self.elector.require_epoch()
        args = [self.elector.election, epoch, ids, self.instance_id, self.broker.name]
        options = [self.max_age, self._limits(), self.reorder_window, self.halt_action]
        with fenced_statement(self.elector.election, epoch):
            async with self.pool.connection() as conn:
                cur = await conn.execute(_CLAIM, [*args, *options])
                rows = await cur.fetchall()
        # Never sent later than this: the next leader settles our claims only after
        # our lease and twice the broker timeout have passed.
        valid_until = datetime.now(UTC) + timedelta(seconds=self._send_budget(len(rows)))
        claimed = []
        for signal_id, acted, state, coid, name, _side, action, start, target, price, where in rows:
            if not acted:  # not pending: nothing to do (null: no such signal)
                status[signal_id] = state or "unknown"
                continue
            if state == "deferred":
                # The signal that makes it valid may be on its way: look again then.
                status[signal_id] = "pending"
                self._later(self.reorder_window.total_seconds(), self.enqueue, [signal_id])
                continue
            if state == "halted":
                status[signal_id] = "pending"
                continue
            status[signal_id] = state
            if state != "executing":  # ended now without an order: expired or rejected
                self.counts[state] = self.counts.get(state, 0) + 1
                log.warning("signal not executed", signal_id=signal_id, status=state)
                continue
            order = OrderRequest(
                coid, self.instrument(name).with_symbol(where), action, start, target, price,
                epoch, self.instance_id, valid_until,
            )  # fmt: skip
            claimed.append(_Claimed(signal_id, order))
        return claimed

    async def _check_positions(
        self, claimed: list[_Claimed], status: dict[int, str], freed: set[str]
    ) -> list[_Claimed]:
        """Keep the orders whose instrument the broker holds as the ledger says."""
        try:
            held = await self.broker.positions([c.order.instrument for c in claimed])
        except BrokerRefused as exc:
            for c in claimed:
                await self._refused(c, exc, status, freed)
            return []
        except BrokerModeMismatch as exc:
            for c in claimed:
                await self._requeue(c, f"not sent: {exc}", status, freed)
            await self._halt(str(exc))
            return []
        except BrokerUnavailable as exc:
            for c in claimed:
                await self._requeue(c, f"not sent: positions unknown: {exc}", status, freed)
            self._pause(self.broker_timeout)
            return []
        ok = []
        for c in claimed:
            order = c.order
            broker = held.get(order.instrument.name, 0)
            if broker == order.start:
                ok.append(c)
                continue
            detail = (
                f"not sent: the broker holds {broker} of {_named(order.instrument)}, the ledger"
                f" {order.start}: a target order would take over a position that is not"
                " ours (a manual trade, another strategy?)"
            )
            await self._in_doubt(c.signal_id, order, detail, sent=False, status=status)
            freed.add(order.instrument.name)
        return ok

    async def _refused(
        self, c: _Claimed, exc: BrokerRefused, status: dict[int, str], freed: set[str]
    ) -> None:
        """Nothing was placed: back to pending, and wait as long as the broker asks."""
        self.counts["refused"] += 1
        await self._requeue(c, f"not placed: {exc}", status, freed)
        if exc.reason == "unauthorised":
            self._refusals += 1
            wait = max(exc.retry_after, backoff(self._refusals, base=1.0, cap=60.0))
            if self._refusals == 1:
                await self._alert("broker_unauthorised", f"{self.broker.name}: {exc}")
            log.critical("broker refuses our orders", error=str(exc), retry_in=round(wait, 1))
        else:
            wait = exc.retry_after
            log.warning("broker asks us to wait", error=str(exc), retry_in=wait)
        self._pause(wait)

    async def _mode_mismatch(
        self, c: _Claimed, exc: BrokerModeMismatch, status: dict[int, str], freed: set[str]
    ) -> None:
        detail = f"the broker answered in another mode than configured: {exc}"
        await self._in_doubt(c.signal_id, c.order, detail, sent=True, status=status)
        freed.add(c.order.instrument.name)
        await self._halt(str(exc))

    def _pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def _requeue(
        self, c: _Claimed, detail: str, status: dict[int, str], freed: set[str]
    ) -> None:
        try:
            async with self.pool.connection() as conn, conn.transaction():
                await self.elector.fence(conn)
                await conn.execute(_REQUEUE, [c.order.client_order_id, detail])
        except (NotLeader, psycopg.Error) as exc:  # the claim stays: settling takes it up
            log.warning(
                "requeue failed; settled later", signal_id=c.signal_id, error=first_line(exc)
            )
            return
        status[c.signal_id] = "pending"
        freed.add(c.order.instrument.name)

    async def _in_doubt(
        self, signal_id: int, order: OrderRequest, detail: str, *, sent: bool,
        status: dict[int, str] | None = None,
    ) -> None:  # fmt: skip
        async with self.pool.connection() as conn:
            await conn.execute(_MARK_IN_DOUBT, [order.client_order_id, detail, sent])
        self.counts["in_doubt"] += 1
        if status is not None:
            status[signal_id] = "in_doubt"
        log.critical("signal in doubt", signal_id=signal_id, detail=detail)

    async def _halt(self, reason: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(_HALT, ["halted", reason, self.instance_id])
        log.critical("trading halted", reason=reason)

    async def _alert(self, kind: str, detail: str) -> None:
        with contextlib.suppress(psycopg.Error):
            async with self.pool.connection() as conn:
                await conn.execute(_RAISE_ALERT, [kind, self.instance_id, detail])

    async def _complete(self, done: Sequence[tuple[OrderRequest, OrderResult]]) -> dict[str, str]:
        """Record the broker's answers, by client order id; returns each recorded
        order's signal status (an unknown client order id is left out)."""
        if not done:
            return {}
        self._refusals = 0  # the broker decided: it takes our orders again
        columns: list[list[str | None]] = [[], [], [], [], []]
        for order, result in done:
            row = (
                order.client_order_id, result.status, result.broker_order_id, result.detail,
                _where(order.instrument),
            )  # fmt: skip
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(_COMPLETE, columns)
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            # The orders went out; recording failed. Settling records them later.
            log.error(
                "orders sent but not recorded; settled later", orders=len(done), error=str(exc)
            )
            return {}
        # A null status: no such order (cannot happen for ours); leave it to settling.
        for _, state, since_received in rows:
            if state == "executed" and since_received is not None:
                self.received_to_executed.observe(since_received)
        return {str(coid): str(state) for coid, state, _ in rows if state is not None}

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
        grace = timedelta(seconds=self.settle)
        async with self.pool.connection() as conn:
            cur = await conn.execute(_EXECUTING, {"epoch": epoch, "grace": grace, "limit": limit})
            rows = await cur.fetchall()
        settled = 0
        for signal_id, claimed_epoch, coid, name, start, target, claimed_at, where in rows:
            # Even one a batch of ours still holds: a claim older than the settle time
            # (at least twice the send budget, by the settings' check) is past any send,
            # and a batch stuck on a dead connection must not block its instrument.
            if claimed_epoch > epoch:
                continue
            if claimed_epoch < epoch and time.monotonic() < self._reconcile_older_after:
                continue
            settled += await self._settle(signal_id, coid, name, start, target, claimed_at, where)
        return settled

    async def _settle(
        self, signal_id: int, coid: str, name: str, start: int | None, target: int | None,
        claimed_at: datetime, where: str | None,
    ) -> int:  # fmt: skip
        known = self._knows(name)
        order = OrderRequest(
            coid, self.instrument(name).with_symbol(where) if known else Instrument(name, "", name),
            "BUY", start or 0, target or 0, None, 0, self.instance_id, claimed_at,
        )  # fmt: skip
        if start is None or target is None or not known:
            detail = f"{name}: an order the broker cannot be asked about (no target recorded)"
            await self._in_doubt(signal_id, order, detail, sent=True)
            return 1
        instrument = order.instrument
        try:
            held = (await self.broker.positions([instrument]))[name]
            placed = 0
            if held == start:
                ids = await self.broker.orders_since(instrument, claimed_at - _CLOCK_MARGIN)
                placed = await self._unknown_orders(name, ids)
        except BrokerRefused as exc:  # rate limited, or a session to renew: ask later
            self._pause(exc.retry_after)
            return 0
        except (BrokerUnavailable, BrokerModeMismatch) as exc:
            # The broker may be down for a moment: give up only after it stayed silent
            # for a settle time and `lookup_attempts` questions, not after a few sweeps.
            now = time.monotonic()
            failures, since = self._lookup_failures.get(coid, (0, now))
            self._lookup_failures[coid] = (failures + 1, since)
            if failures + 1 < self.lookup_attempts or now - since < self.settle:
                return 0
            self._lookup_failures.pop(coid, None)
            detail = f"{name}: the broker cannot tell whether it got the order: {exc}"
            await self._in_doubt(signal_id, order, detail, sent=True)
            return 1
        self._lookup_failures.pop(coid, None)
        if held == target:
            result = OrderResult(None, "filled", "settled: the broker is at the target")
            if coid not in await self._complete([(order, result)]):
                return 0
            log.warning("settled: the broker is at the target", signal_id=signal_id)
            return 1
        if held == start and placed == 0:
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    await self.elector.fence(conn)
                    await conn.execute(_REQUEUE, [coid, "settled: the broker never placed it"])
            except NotLeader:
                return 0
            log.warning("settled: the broker never placed the order; requeued", signal_id=signal_id)
            self.enqueue([signal_id])
            return 1
        detail = (
            f"{_named(instrument)}: expected {target} (or {start} before the order), the broker"
            f" holds {held}" + (f" with {placed} order(s) since the claim" if placed else "")
        )
        await self._in_doubt(signal_id, order, detail, sent=True)
        return 1

    async def _unknown_orders(self, name: str, ids: list[str]) -> int:
        """How many of these broker orders no order of ours recorded."""
        if not ids:
            return 0
        async with self.pool.connection() as conn:
            cur = await conn.execute(_UNKNOWN_ORDERS, [ids, name])
            return len(await cur.fetchall())

    def _knows(self, name: str) -> bool:
        return self.instruments is None or name in self.instruments


def _where(instrument: Instrument) -> str:
    """exchange:symbol:product, where the order trades."""
    parts = (instrument.exchange, instrument.symbol, instrument.product)
    return ":".join(p for p in parts if p)


def _named(instrument: Instrument) -> str:
    """The webhook's instrument, and where it trades when that says more."""
    where = _where(instrument)
    return instrument.name if where == instrument.name else f"{instrument.name} ({where})"
