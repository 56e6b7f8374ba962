"""Futures rollover: move an open position from the expiring contract to the next.

For each instrument with a contract rule (service/contracts.py), once the day is
inside the held contract's roll window and the exchange is in session, the
leader rolls the whole open position: it closes the near contract first, then
opens the same lots on the same side in the next one. Closing before opening
means there is never a moment of doubled exposure (there is a short one of none).

A roll is a persistent state machine, a row of gateway.rollovers:

    due -> exiting -> entering -> rolled

opened and finished in SERIALIZABLE transactions (retried on a serialization
failure), every write fenced by the epoch. While a roll is active no signal of
its instrument is claimed. Each step asks the broker first and sends only what
is still needed (a target order: the contract's target net position), so a
leader that dies anywhere in a roll leaves it to the next leader, which finishes
it without a second order: exit already done (the near contract is flat) goes
straight to entering; entry already done (the next contract at the target)
goes straight to rolled. After an unknown outcome it waits a settle time before
it looks again. A roll due while trading is halted, or one whose broker position
is neither before nor after its step, pages (alert) and waits for a human.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from pgleader.errors import backoff
from pgleader.jobs import JobRun
from service.brokers.base import Broker, Instrument, OrderRequest, OrderResult
from service.contracts import contract_symbol
from service.errors import BrokerModeMismatch, BrokerRefused
from service.queries import QUERIES

__all__ = ["Rollover"]

log = structlog.get_logger("service.jobs.rollover")

_ACTIVE = QUERIES["active_rollovers"]
_OPEN = QUERIES["open_contracts"]
_HALT = QUERIES["trading_halt"]
_SERIALIZABLE = QUERIES["serializable"]
_START = QUERIES["start_rollover"]
_STATE = QUERIES["set_rollover_state"]
_BOOK = QUERIES["book_rollover_order"]
_RECORD = QUERIES["record_rollover_order"]
_FINISH = QUERIES["finish_rollover"]
_LAST_ORDER_AGE = QUERIES["rollover_last_order_age"]
_RAISE_ALERT = QUERIES["raise_alert"]
_ATTEMPTS = 5  # of a SERIALIZABLE transaction


@dataclass(frozen=True, slots=True)
class _Roll:
    id: int
    instrument: str
    from_contract: str
    from_expiry: date
    to_contract: str
    to_expiry: date
    side: str
    lots: int
    units: int
    state: str
    age_s: float

    @property
    def signed(self) -> int:
        return -self.units if self.side == "short" else self.units


class Rollover:
    """The `rollover` job. `clock` gives the time the calendars are read at (the
    wall clock in service; tests inject theirs); `on_rolled(instrument)` is told
    when a roll ends, so signals that waited behind it go."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        broker: Broker,
        instruments: Mapping[str, Instrument] | None,
        *,
        settle: float = 30.0,
        broker_timeout: float = 5.0,
        stuck_after: float = 300.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_rolled: Callable[[str], None] = lambda name: None,
    ) -> None:
        self.pool = pool
        self.broker = broker
        self.futures = {n: i for n, i in (instruments or {}).items() if i.contract is not None}
        self.settle = settle
        self.broker_timeout = broker_timeout
        self.stuck_after = stuck_after
        self.clock = clock
        self.on_rolled = on_rolled
        self._paged: set[tuple[str, str, date]] = set()
        self.conflicts = 0  # SERIALIZABLE transactions retried

    async def run(self, run: JobRun) -> str:
        if not self.futures:
            return "no futures with a contract rule"
        now = self.clock()
        async with self.pool.connection() as conn:
            halt = await (await conn.execute(_HALT)).fetchone()
            active = [_Roll(*row) for row in await (await conn.execute(_ACTIVE)).fetchall()]
            held = {row[0]: row for row in await (await conn.execute(_OPEN)).fetchall()}
        mode = halt[0] if halt else "running"
        notes = []
        rolling = {roll.instrument for roll in active}
        for roll in active:
            notes.append(await self._continue(run, roll, mode, now))
        for name, instrument in self.futures.items():
            if name in rolling or name not in held or held[name][3] is None:
                continue
            if held[name][4] > 1:  # never made by the executor or a roll: a human's doing
                await self._page(run, "rollover_stuck", name, now.date(),
                                 f"{name}: open positions in {held[name][4]} contracts at once:"
                                 " roll it by hand")  # fmt: skip
                continue
            note = await self._maybe_start(run, instrument, held[name][3], mode, now)
            if note:
                notes.append(note)
        return "; ".join(notes) or "nothing to roll"

    # -- starting a roll -------------------------------------------------------------

    async def _maybe_start(
        self, run: JobRun, instrument: Instrument, where: str, mode: str, now: datetime
    ) -> str | None:
        rule, calendar = instrument.contract, instrument.calendar
        assert rule is not None and calendar is not None
        today = calendar.local_date(now)
        symbol = instrument.with_symbol(where).symbol
        current = rule.contract_on(calendar, today)
        if current.symbol == symbol:
            return None  # not in the roll window yet
        expiries = {
            contract_symbol(rule.underlying, day): day
            for day in rule.expiry_dates(calendar, today - timedelta(days=200), months=9)
        }
        from_expiry = expiries.get(symbol)
        name = instrument.name
        if from_expiry is None or from_expiry < today:
            await self._page(run, "rollover_stuck", name, today,
                             f"{name}: the open position is in {where}, which is not a contract"
                             f" of the rule or expired before {today}: roll it by hand")  # fmt: skip
            return f"{name}: held contract {symbol} unknown or expired"
        if not calendar.in_session(now):
            return f"{name}: roll to {current.symbol} due, waiting for the session"
        if mode != "running":
            await self._page(run, "rollover_blocked", name, today,
                             f"{name}: roll from {symbol} (expires {from_expiry}) to"
                             f" {current.symbol} is due but trading is {mode}: a contract left"
                             " open past expiry may settle (or go to delivery)")  # fmt: skip
            return f"{name}: roll due, trading {mode}"
        to_where = _where(instrument, current.symbol)
        args = [run.election, run.epoch, run.instance_id, name, where, from_expiry, to_where,
                current.expiry, instrument.lot_size]  # fmt: skip
        row = await self._serializable(run, "start", args)
        if row is None or row[0] is None:
            return f"{name}: roll not started (an order in flight)"
        log.warning("rollover started", instrument=name, to=to_where, roll=row[0])
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(_ACTIVE)).fetchall()
        roll = next(_Roll(*r) for r in rows if r[0] == row[0])
        return await self._continue(run, roll, mode, now)

    # -- the steps -------------------------------------------------------------------

    async def _continue(self, run: JobRun, roll: _Roll, mode: str, now: datetime) -> str:
        name = roll.instrument
        instrument = self.futures.get(name)
        calendar = instrument.calendar if instrument else None
        if instrument is None or calendar is None:
            await self._page(run, "rollover_stuck", name, now.date(),
                             f"roll {roll.id} of {name}: the instrument has no contract rule"
                             " any more: finish it by hand")  # fmt: skip
            return f"{name}: roll {roll.id} stuck (no contract rule)"
        today = calendar.local_date(now)
        if roll.state == "entering" and roll.age_s > self.stuck_after:
            await self._page(run, "rollover_stuck", name, today,
                             f"roll {roll.id} of {name}: exited {roll.from_contract}, not yet in"
                             f" {roll.to_contract} after {roll.age_s:.0f} s: the position is"
                             " flat until it enters")  # fmt: skip
        if not calendar.in_session(now):
            return f"{name}: roll {roll.id} {roll.state}, waiting for the session"
        if mode != "running":
            await self._page(
                run,
                "rollover_blocked",
                name,
                today,
                f"roll {roll.id} of {name} is {roll.state} but trading is {mode}",
            )
            return f"{name}: roll {roll.id} {roll.state}, trading {mode}"
        near = instrument.with_symbol(roll.from_contract)
        far = instrument.with_symbol(roll.to_contract)
        if roll.state in ("due", "exiting"):
            if roll.state == "due":
                await self._state(run, roll.id, "exiting", None)
            step = await self._step(run, roll, near, "exit", roll.signed, 0, today)
            if step != "done":
                return f"{name}: roll {roll.id} exit {step}"
            await self._state(run, roll.id, "entering", None)
        step = await self._step(run, roll, far, "entry", 0, roll.signed, today)
        if step != "done":
            return f"{name}: roll {roll.id} entry {step}"
        row = await self._serializable(run, "finish", [run.election, run.epoch, run.instance_id,
                                                      roll.id])  # fmt: skip
        log.warning("rollover done", instrument=name, roll=roll.id, to=roll.to_contract)
        self.on_rolled(name)
        return f"{name}: rolled {roll.side} {roll.lots} lots to {roll.to_contract}" + (
            "" if row and row[0] else " (already)"
        )

    async def _step(
        self, run: JobRun, roll: _Roll, at: Instrument, step: str, start: int, target: int,
        today: date,
    ) -> str:  # fmt: skip
        """One side of the roll: 'done' once the broker holds `target` of `at`, after
        sending the order if it still holds `start`; else what it waits for."""
        held = (await self.broker.positions([at]))[at.name]
        if held == target:
            return "done"
        if held != start:
            await self._page(run, "rollover_stuck", roll.instrument, today,
                             f"roll {roll.id} of {roll.instrument} ({step}): the broker holds"
                             f" {held} of {at.symbol}, expected {start} before the order or"
                             f" {target} after it: resolve it by hand")  # fmt: skip
            return f"stuck: the broker holds {held} of {at.symbol}"
        async with self.pool.connection() as conn:
            row = await (await conn.execute(_LAST_ORDER_AGE, [roll.id, target])).fetchone()
        if row and row[0] is not None and row[0] < self.settle:
            # An earlier order of this step may still reach the broker: wait it out.
            return "waits: an earlier order's outcome is not known yet"
        async with self.pool.connection() as conn:
            with run.fenced():
                cur = await conn.execute(_BOOK, [
                    run.election, run.epoch, run.instance_id, self.broker.name, roll.id, step,
                    _where(at, at.symbol), start, target])  # fmt: skip
                booked = await cur.fetchone()
        assert booked is not None
        coid: str = booked[0]
        action: Literal["BUY", "SELL"] = booked[1]
        valid_until = datetime.now(UTC) + timedelta(seconds=self.broker_timeout)
        order = OrderRequest(coid, at, action, start, target, None, run.epoch, run.instance_id,
                             valid_until)  # fmt: skip
        (answer,) = await self.broker.place_many([order])
        if isinstance(answer, OrderResult):
            await self._record(coid, answer.status, answer.broker_order_id, answer.detail)
            if answer.status in ("filled", "matched"):
                return "done"
            await self._page(run, "rollover_stuck", roll.instrument, today,
                             f"roll {roll.id} of {roll.instrument}: the {step} order was"
                             f" {answer.status}: {answer.detail}")  # fmt: skip
            return f"{answer.status}: {answer.detail}"
        outcome = "not_sent" if isinstance(answer, BrokerRefused) else "unknown"
        await self._record(coid, outcome, None, str(answer))
        if isinstance(answer, BrokerModeMismatch):
            await self._page(run, "rollover_stuck", roll.instrument, today,
                             f"roll {roll.id} of {roll.instrument}: {answer}")  # fmt: skip
        return f"{outcome}: {answer}"

    # -- the database ------------------------------------------------------------------

    async def _serializable(self, run: JobRun, what: str, args: list[Any]) -> Any:
        """Run one fenced function in a SERIALIZABLE transaction, retried when it
        conflicts with another (a claim of the same instrument, say)."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    await conn.execute(_SERIALIZABLE)
                    with run.fenced():
                        if what == "start":
                            cur = await conn.execute(_START, args)
                        else:
                            cur = await conn.execute(_FINISH, args)
                        return await cur.fetchone()
            except psycopg.errors.SerializationFailure:
                self.conflicts += 1
                if attempt == _ATTEMPTS:
                    raise
                log.info("rollover transaction conflicted; retrying", attempt=attempt)
                await asyncio.sleep(backoff(attempt, base=0.05, cap=1.0, jitter=0.5))
        return None

    async def _state(self, run: JobRun, roll_id: int, state: str, detail: str | None) -> None:
        async with self.pool.connection() as conn:
            with run.fenced():
                await conn.execute(_STATE, [run.election, run.epoch, roll_id, state, detail])

    async def _record(
        self, coid: str, outcome: str, broker_id: str | None, detail: str | None
    ) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(_RECORD, [coid, outcome, broker_id, detail])

    async def _page(self, run: JobRun, kind: str, name: str, day: date, detail: str) -> None:
        """An alert a human must act on: once per kind, instrument and day per leader."""
        if (kind, name, day) in self._paged:
            return
        self._paged.add((kind, name, day))
        log.critical("rollover needs attention", kind=kind, detail=detail)
        async with self.pool.connection() as conn:
            await conn.execute(_RAISE_ALERT, [kind, run.instance_id, detail])


def _where(instrument: Instrument, symbol: str) -> str:
    return f"{instrument.exchange}:{symbol}:{instrument.product}"
