"""The rollover job on a calendar the test controls (an injected clock, never the
wall clock), in process against the real database and the paper broker: the roll
window from a holiday-moved expiry, the exchange session, and a serialization
conflict retried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from pgleader import Elector, Timings
from pgleader.jobs import JobRun
from service.brokers.base import Instrument
from service.brokers.paper import PaperBroker
from service.contracts import Calendar, ContractRule
from service.jobs.rollover import Rollover

IST = ZoneInfo("Asia/Kolkata")
# NSE: the last Tuesday of December 2026 (29th) made a holiday here, so the
# contract expires on Monday the 28th; two trading days before it (25th a holiday,
# 26th-27th a weekend) the roll window opens on Wednesday the 23rd. January's last
# Tuesday, the 26th, is Republic Day: the next contract expires on the 25th.
CALENDAR = Calendar("NFO", holidays=frozenset({date(2026, 12, 25), date(2026, 12, 29),
                                               date(2027, 1, 26)}))  # fmt: skip
NIFTY = Instrument("NIFTY1!", "NFO", "NIFTY", "NRML", 75, None,
                   ContractRule("NIFTY", expiry="last-tuesday", roll_days_before=2), CALENDAR)  # fmt: skip
NEAR, NEXT = "NIFTY28DEC26FUT", "NIFTY25JAN27FUT"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 22, 10, 0, tzinfo=IST)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def leading(dsn: str) -> AsyncIterator[tuple[AsyncConnectionPool[Any], JobRun]]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
    )
    await pool.open()
    elector = Elector(dsn, "gateway", instance_id="roller", timings=Timings(0.2, 0.6, 1.2))
    async with elector:
        epoch = await elector.wait_for_leadership(10)
        async with pool.connection() as conn:
            # A long position of 2 lots in the December contract, at the broker too.
            await conn.execute(
                "insert into gateway.positions (instrument, position, side, is_base_position,"
                " lots, contract) values ('NIFTY1!', 'Long_1', 'long', true, 2, %s)",
                [f"NFO:{NEAR}:NRML"],
            )
            await conn.execute(
                "insert into gateway.paper_broker_requests (client_order_id, instrument, action,"
                " quantity, target) values ('seed', %s, 'BUY', 150, 150)",
                [NEAR],
            )
        yield pool, JobRun("rollover", "gateway", epoch, "roller")
    await pool.close()


async def book(pool: AsyncConnectionPool[Any]) -> dict[str, int]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select instrument, sum(case action when 'BUY' then quantity else -quantity end)"
            " from gateway.paper_broker_requests group by instrument"
        )
        return {name: int(held) for name, held in await cur.fetchall()}


async def held_contract(pool: AsyncConnectionPool[Any]) -> str:
    async with pool.connection() as conn:
        cur = await conn.execute("select contract from gateway.positions where status = 'open'")
        (contract,) = await cur.fetchone() or (None,)
        return str(contract)


async def test_the_roll_waits_for_its_window_and_the_session_then_rolls(leading):
    pool, run = leading
    clock = Clock()
    job = Rollover(pool, PaperBroker(pool), {NIFTY.name: NIFTY}, clock=clock)

    assert await job.run(run) == "nothing to roll"  # the 22nd: before the window
    clock.now = datetime(2026, 12, 23, 8, 30, tzinfo=IST)  # in the window, before the open
    assert "waiting for the session" in await job.run(run)
    assert await book(pool) == {NEAR: 150}

    clock.now = datetime(2026, 12, 23, 9, 15, tzinfo=IST)  # the open
    assert await job.run(run) == f"NIFTY1!: rolled long 2 lots to NFO:{NEXT}:NRML"
    assert await book(pool) == {NEAR: 0, NEXT: 150}
    assert await held_contract(pool) == f"NFO:{NEXT}:NRML"
    assert await job.run(run) == "nothing to roll"  # rolled once, not again


async def test_a_serialization_conflict_with_the_ledger_is_retried(leading, dsn):
    pool, run = leading
    clock = Clock()
    clock.now = datetime(2026, 12, 23, 11, 0, tzinfo=IST)
    job = Rollover(pool, PaperBroker(pool), {NIFTY.name: NIFTY}, clock=clock)
    async with await psycopg.AsyncConnection.connect(dsn) as other:
        # Another transaction changes the position the roll is about to mark: the
        # roll's SERIALIZABLE transaction waits on the row, then cannot serialize.
        await other.execute("update gateway.positions set stop = 1 where instrument = 'NIFTY1!'")
        rolling = asyncio.create_task(job.run(run))
        async with pool.connection() as conn:
            for _ in range(400):
                cur = await conn.execute(
                    "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                    " and query like '%%start_rollover%%'"
                )
                if (await cur.fetchone() or (0,))[0]:
                    break
                await asyncio.sleep(0.025)
            else:
                pytest.fail("the roll never waited for the other transaction")
        await other.commit()
        result = await asyncio.wait_for(rolling, 20)

    assert job.conflicts == 1
    assert result == f"NIFTY1!: rolled long 2 lots to NFO:{NEXT}:NRML"
    assert await book(pool) == {NEAR: 0, NEXT: 150}
