"""`pgleader settle`: a signal in doubt (or awaiting approval) settled by hand, after
the operator read the broker's order book. Real database, the in-process executor and
the paper broker (whose book is a table) make the doubt; the CLI settles it."""

from __future__ import annotations

import json
from typing import Any

from service.brokers.paper import PaperBroker
from service.errors import BrokerUnavailable
from service.execution.executor import Executor
from tests.gateway.test_gateway_faults import broker_trade, leave_executing, reconcile_until
from tests.support.cli import pgleader_here


async def settle(dsn: str, sid: int, *flags: str) -> tuple[int, dict[str, Any] | None, str]:
    code, out, err = await pgleader_here("settle", str(sid), *flags, "--dsn", dsn)
    return code, json.loads(out) if out.strip() else None, err


async def row(db, query: str, *params: Any) -> tuple[Any, ...]:
    return await (await db.execute(query, list(params))).fetchone()


async def pending_signal(db, kind: str = "PYRAMID", lots: int = 1) -> int:
    (sid,) = await row(
        db,
        "insert into gateway.signals (fingerprint, type, instrument, position, lots, price,"
        " signal_at, payload, received_by) values (md5(random()::text), %s, 'NIFTY',"
        " 'Long_1', %s, 100, now(), '{}', 'gw1') returning id",
        kind, lots,
    )  # fmt: skip
    return int(sid)


class Blindfolded(PaperBroker):
    """The paper broker, unable to say what it holds until its blindfold is taken off."""

    name = "paper"
    blind = True

    async def positions(self, instruments):
        if self.blind:
            raise BrokerUnavailable("position book unavailable")
        return await super().positions(instruments)


async def in_doubt(db, executor_for, *, reached_broker: bool) -> tuple[int, Executor]:
    """A signal whose order the broker could not account for; the executor that
    left it so, its broker able to see again."""
    sid, _ = await leave_executing(db, 7, reached_broker=reached_broker)
    executor = await executor_for(Blindfolded)
    await reconcile_until(executor)
    assert await row(db, "select status from gateway.signals where id = %s", sid) == ("in_doubt",)
    executor.broker.blind = False
    return sid, executor


async def test_an_order_that_filled_moves_the_ledger_and_the_instrument_trades_again(
    dsn, db, executor_for
):
    sid, executor = await in_doubt(db, executor_for, reached_broker=True)  # the broker holds 2
    code, settled, err = await settle(dsn, sid, "--filled", "--reason", "order 17 complete")
    assert code == 0, err
    assert settled == {"signal_id": sid, "before": "in_doubt", "status": "executed",
                       "instrument": "NIFTY", "ledger_lots": 2}  # fmt: skip
    assert await row(db, "select outcome from gateway.orders where signal_id = %s", sid) == (
        "filled",
    )
    (detail,) = await row(db, "select detail from gateway.signals where id = %s", sid)
    assert detail.startswith("settled by hand as filled by cli:") and "order 17 complete" in detail
    (alert,) = await row(
        db,
        "select detail from gateway.alerts where kind = 'signal_settled' and signal_id = %s",
        sid,
    )
    assert "BASE_ENTRY long NIFTY Long_1 settled by hand as filled" in alert
    # The ledger is the broker's again: the next signal goes out, as a target of 3.
    assert await executor.execute(await pending_signal(db)) == "executed"
    assert await row(db, "select sum(case action when 'BUY' then quantity else -quantity end)"
                     " from gateway.paper_broker_requests") == (3,)  # fmt: skip
    # Settled once: a second try is refused, and nothing moves.
    code, _, err = await settle(dsn, sid, "--not-filled", "--reason", "changed my mind")
    assert code == 1 and "is executed, not in doubt" in err and "nothing changed" in err
    assert await row(db, "select net_lots from gateway.net_positions") == (3,)


async def test_an_order_that_never_filled_fails_and_leaves_the_ledger(dsn, db, executor_for):
    sid, executor = await in_doubt(db, executor_for, reached_broker=False)  # the broker: 0
    code, settled, err = await settle(dsn, sid, "--not-filled", "--reason", "rejected: margin")
    assert code == 0, err
    assert (settled["status"], settled["ledger_lots"]) == ("failed", 0), settled
    assert await row(db, "select outcome from gateway.orders where signal_id = %s", sid) == (
        "rejected",
    )
    assert await row(db, "select count(*) from gateway.positions") == (0,)
    assert await executor.execute(await pending_signal(db, "BASE_ENTRY", 2)) == "executed"


async def test_filled_is_refused_when_it_cannot_be_true(dsn, db, executor_for):
    # A later order of the instrument filled: it needed the broker at the ledger without ours.
    sid, executor = await in_doubt(db, executor_for, reached_broker=False)
    later = await pending_signal(db, "BASE_ENTRY", 2)
    assert await executor.execute(later) == "executed"
    code, settled, err = await settle(dsn, sid, "--filled", "--reason", "I think it went")
    assert (code, settled) == (1, None)
    assert f"signal {later} of NIFTY was executed after signal {sid}" in err, err
    # An order never sent (the broker's position was not the ledger's) cannot have filled.
    await broker_trade(db, "manual", 5)
    stopped = await pending_signal(db)
    assert await executor.execute(stopped) == "in_doubt"
    code, _, err = await settle(dsn, stopped, "--filled", "--reason", "x")
    assert code == 1 and f"signal {stopped} had no order sent" in err, err
    assert await row(db, "select status from gateway.signals where id = %s", sid) == ("in_doubt",)
    assert await row(db, "select net_lots from gateway.net_positions") == (2,)
    # Unknown, and not settled by hand: a pending or executing signal is the leader's.
    code, _, err = await settle(dsn, 999_999, "--not-filled", "--reason", "x")
    assert code == 1 and "no signal 999999" in err
    pending = await pending_signal(db)
    code, _, err = await settle(dsn, pending, "--not-filled", "--reason", "x")
    assert code == 1 and f"signal {pending} is pending, not in doubt" in err
    assert await row(db, "select count(*) from gateway.alerts where kind = 'signal_settled'") == (
        0,
    )


async def test_an_order_approved_at_the_broker_is_settled_filled(dsn, db):
    """OpenAlgo's semi-automatic mode: the order waited for a human, who approved it."""
    (sid,) = await row(
        db,
        "insert into gateway.signals (fingerprint, type, instrument, position, side, lots,"
        " price, signal_at, payload, received_by, status, claimed_epoch)"
        " values ('fp-approval', 'BASE_ENTRY', 'NIFTY', 'Short_1', 'short', 3, 100, now(),"
        " '{}', 'gw1', 'awaiting_approval', 1) returning id",
    )  # fmt: skip
    await db.execute(
        "insert into gateway.orders (signal_id, epoch, instance_id, broker, client_order_id,"
        " action, quantity, outcome, side, lots, start_position, target_position, symbol)"
        " values (%s, 1, 'gw1', 'openalgo', 'pgl-x-e1-1', 'SELL', 225, 'awaiting_approval',"
        " 'short', 3, 0, -225, 'NFO:NIFTY29DEC26FUT:NRML')",
        [sid],
    )  # fmt: skip
    code, settled, err = await settle(dsn, sid, "--filled", "--reason", "approved 10:02")
    assert code == 0, err
    assert settled == {"signal_id": sid, "before": "awaiting_approval", "status": "executed",
                       "instrument": "NIFTY", "ledger_lots": -3}  # fmt: skip
    assert await row(
        db, "select side, lots, contract from gateway.positions where signal_id = %s", sid
    ) == ("short", 3, "NFO:NIFTY29DEC26FUT:NRML")
