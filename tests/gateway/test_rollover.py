"""Futures rollover by the leader's `rollover` job, on real gateways trading at the
fake OpenAlgo: exit the near contract first, then enter the next with the same
lots and side; a roll a leader leaves half done is finished by the next leader
without a second order; a roll due while halted pages and waits.

The calendar is the test's own: every weekday trades, the session is the whole
day in UTC, and the expiries are explicit dates a few days from today, so the
roll window is set by `roll_days_before` alone (first 0: the position opens in
the near contract; then 5: today is inside the near contract's roll window).
The clock-driven rules (sessions, holidays, windows) are proven with an injected
clock in tests/unit/test_contracts.py and tests/gateway/test_rollover_job.py.
"""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.contracts import contract_symbol
from tests.support.gateway import (
    OPENALGO_KEY,
    cluster,
    distinct_time,
    openalgo_env,
    query_true,
    signal_body,
    until,
)
from tests.support.openalgo import FakeOpenAlgo

TODAY = datetime.now(UTC).date()
EXPIRIES = [TODAY + timedelta(days=d) for d in (3, 33, 63)]
NEAR, FAR = (contract_symbol("NIFTY", d) for d in EXPIRIES[:2])
NEAR_BN, FAR_BN = (contract_symbol("BANKNIFTY", d) for d in EXPIRIES[:2])


def instruments(path: Path, roll_days_before: int) -> Path:
    dates = ", ".join(d.isoformat() for d in EXPIRIES)
    path.write_text(f"""
[calendars.NFO]
timezone = "UTC"
session = "00:00-23:59"
weekdays = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]

[instruments."NIFTY1!"]
exchange = "NFO"
underlying = "NIFTY"
expiries = [{dates}]
roll_days_before = {roll_days_before}
lot_size = 75

[instruments."BANKNIFTY1!"]
exchange = "NFO"
underlying = "BANKNIFTY"
expiries = [{dates}]
roll_days_before = {roll_days_before}
lot_size = 30
""")
    return path


def env(fake: FakeOpenAlgo, path: Path, **settings: Any) -> dict[str, str]:
    return openalgo_env(fake.url, OPENALGO_KEY, path, rollover_interval=1, broker_timeout=0.5,
                        broker_settle=1.0, **settings)  # fmt: skip


def placed(fake: FakeOpenAlgo, *symbols: str) -> list[tuple[str, str, int]]:
    return [(o.symbol, o.action, o.quantity) for o in fake.orders if o.symbol in symbols]


async def opened(gw: Any, node: Any, instrument: str, side: str, lots: int) -> None:
    body = signal_body(instrument=instrument, lots=lots, at=distinct_time(),
                       position=f"{side.title()}_1", side=side)  # fmt: skip
    status, answer = await gw.post(node, body)
    assert (status, answer["status"]) == (200, "executed"), answer


@pytest.fixture
async def fake():
    fake = FakeOpenAlgo(OPENALGO_KEY, smart_order_delay=0.0)
    await fake.start()
    yield fake
    await fake.close()


async def test_an_open_future_is_rolled_exit_first_then_the_same_side_and_lots_next_month(
    dsn, tmp_path, fake
):
    async with cluster(dsn, tmp_path) as gw:
        (first,) = await gw.start(1, env=env(fake, instruments(tmp_path / "a.toml", 0)))
        await gw.leader()
        await opened(gw, first, "NIFTY1!", "long", 2)
        await opened(gw, first, "BANKNIFTY1!", "short", 3)
        assert fake.position(NEAR, "NFO", "NRML") == 150
        assert fake.position(NEAR_BN, "NFO", "NRML") == -90
        await first.stop()

        # Five trading days before the near expiry: today is in its roll window.
        (node,) = await gw.start(1, env=env(fake, instruments(tmp_path / "b.toml", 5)))
        rolled = "select count(*) = 2 from gateway.rollovers where state = 'rolled'"
        await until(query_true(gw, rolled))

        # Closed before opened: never both contracts at once; a short is never bought
        # into the next month (its exit buys, its entry sells).
        assert placed(fake, NEAR, FAR) == [
            (NEAR, "BUY", 150),
            (NEAR, "SELL", 150),
            (FAR, "BUY", 150),
        ]
        assert placed(fake, NEAR_BN, FAR_BN) == [
            (NEAR_BN, "SELL", 90), (NEAR_BN, "BUY", 90), (FAR_BN, "SELL", 90),
        ]  # fmt: skip
        assert fake.position(FAR, "NFO", "NRML") == 150 and fake.position(NEAR, "NFO", "NRML") == 0
        assert fake.position(FAR_BN, "NFO", "NRML") == -90
        contracts = dict(await gw.query(
            "select instrument, min(contract) from gateway.positions where status = 'open'"
            " group by instrument"))  # fmt: skip
        assert contracts == {"NIFTY1!": f"NFO:{FAR}:NRML", "BANKNIFTY1!": f"NFO:{FAR_BN}:NRML"}
        assert len(await gw.alerts("rollover_completed")) == 2
        # The ledger and the broker agree afterwards, and a pyramid adds to the new month.
        await opened(gw, node, "NIFTY1!", "long", 1)
        assert fake.position(FAR, "NFO", "NRML") == 225
        assert placed(fake, NEAR) == [(NEAR, "BUY", 150), (NEAR, "SELL", 150)]


async def test_a_leader_killed_after_the_entry_was_placed_leaves_the_roll_to_the_next_without_a_second_order(
    dsn, tmp_path, fake
):
    hourly = {"PGLEADER_ROLLOVER_INTERVAL": "3600"}  # the job runs only when asked
    async with cluster(dsn, tmp_path) as gw:
        early = instruments(tmp_path / "a.toml", 0)
        (first,) = await gw.start(1, env={**env(fake, early), **hourly})
        await gw.leader()
        await opened(gw, first, "NIFTY1!", "long", 2)
        await first.stop()

        # The entry reaches the broker, its answer never comes back: the roll stays
        # 'entering' with the entry's outcome unknown. Then its leader dies.
        fake.faults.update({"drop_after_apply": True, "symbol": FAR, "calls": 1})
        late = instruments(tmp_path / "b.toml", 5)
        (dying,) = await gw.start(1, env={**env(fake, late), **hourly})
        await gw.leader()
        status, run = await gw.admin(dying, "/admin/jobs/rollover/run")
        assert (status, run["outcome"]) == (200, "succeeded"), run
        assert "entry unknown" in run["result"], run
        assert await gw.scalar("select state from gateway.rollovers") == "entering"
        assert fake.position(FAR, "NFO", "NRML") == 150
        (successor,) = await gw.start(1, env=env(fake, late))
        dying.signal(signal.SIGKILL)
        await dying.wait()
        assert await gw.leader() is successor

        rolled = "select count(*) = 1 from gateway.rollovers where state = 'rolled'"
        await until(query_true(gw, rolled))
        assert placed(fake, NEAR, FAR) == [
            (NEAR, "BUY", 150),
            (NEAR, "SELL", 150),
            (FAR, "BUY", 150),
        ]
        finisher = "select instance_id from gateway.alerts where kind = 'rollover_completed'"
        assert await gw.scalar(finisher) == successor.instance_id
        outcomes = await gw.query(
            "select outcome from gateway.orders where rollover_id is not null order by id"
        )
        assert [o for (o,) in outcomes] == ["filled", "unknown"]


async def test_a_roll_due_while_halted_pages_and_waits_for_resume(dsn, tmp_path, fake):
    async with cluster(dsn, tmp_path) as gw:
        (first,) = await gw.start(1, env=env(fake, instruments(tmp_path / "a.toml", 0)))
        await gw.leader()
        await opened(gw, first, "NIFTY1!", "short", 1)
        await gw.query("select gateway.set_trading_halt('halted', 'test', 'test')")
        await first.stop()

        (node,) = await gw.start(1, env=env(fake, instruments(tmp_path / "b.toml", 5)))
        paged = "select count(*) > 0 from gateway.alerts where kind = 'rollover_blocked'"
        await until(query_true(gw, paged))
        assert placed(fake, NEAR, FAR) == [(NEAR, "SELL", 75)]  # the entry only
        assert "expires" in (await gw.alerts("rollover_blocked"))[0]

        status, answer = await gw.admin(node, "/admin/resume")
        assert status == 200, answer
        rolled = "select count(*) = 1 from gateway.rollovers where state = 'rolled'"
        await until(query_true(gw, rolled))
        assert placed(fake, NEAR, FAR) == [(NEAR, "SELL", 75), (NEAR, "BUY", 75), (FAR, "SELL", 75)]
