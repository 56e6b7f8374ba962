"""Reconciliation: the ledger's net positions against the broker's, per instrument.

Real `pgleader serve` processes and the fake OpenAlgo. Positions are opened
through the gateway, then one side is changed behind its back (the fake's book,
or the ledger's rows) to make each outcome; runs are asked for over HTTP and
with `pgleader reconcile`, and read back from gateway.reconciliations and
gateway.alerts. Each test has a database, a fake and gateways of its own: a run
compares every instrument, so one test's leftovers would be another's mismatch.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import (
    Traded,
    Trading,
    futures,
    pgleader_cli,
    query_true,
    trading_at,
    until,
)
from tests.support.openalgo import Position

INSTRUMENTS = {
    **futures("MATCHED", "ORPHANED", "MISSING", "MISMATCH"),
    "SHORT_FUT": Traded("NFO", "BANKNIFTY29DEC26FUT", lot_size=30),
}


@pytest.fixture
async def trading(dsn: str, tmp_path: Path) -> AsyncIterator[Trading]:
    async with trading_at(dsn, tmp_path, INSTRUMENTS) as t:
        yield t


async def opened(t: Trading, instrument: str, lots: int, **fields: Any) -> None:
    status, answer = await t.post(instrument=instrument, lots=lots, **fields)
    assert (status, answer["status"]) == (200, "executed"), answer


async def reconcile_over_http(t: Trading) -> dict[str, Any]:
    status, run = await t.gw.admin(t.node, "/admin/reconcile")
    assert status == 200, run  # the leader ran it within the request's 10 s
    return run


async def reconcile_with_the_cli(t: Trading) -> tuple[int, dict[str, Any]]:
    code, out, err = await pgleader_cli("reconcile", "--dsn", t.gw.dsn, "--timeout", "20")
    assert code in (0, 1) and err == "", (code, err)
    return code, json.loads(out)  # stdout is a pipe here: one JSON object


async def test_positions_that_agree_reconcile_as_matched(trading):
    await opened(trading, "MATCHED", 2)
    await opened(trading, "SHORT_FUT", 1, side="short", position="Short_1")
    placed = len(trading.fake.orders)

    run = await reconcile_over_http(trading)
    assert (run["status"], run["outcome"], run["trigger"]) == ("matched", "matched", "admin"), run
    assert run["items"] == [
        {"instrument": "MATCHED", "outcome": "matched", "ledger": 150, "broker": 150},
        {"instrument": "SHORT_FUT", "outcome": "matched", "ledger": -30, "broker": -30},
    ]
    code, run = await reconcile_with_the_cli(trading)
    assert (code, run["outcome"], run["trigger"]) == (0, "matched", "cli"), run
    assert len(run["items"]) == 2

    kinds = await trading.gw.query(
        "select kind from gateway.alerts where kind like 'reconciliation%%'"
    )
    assert kinds == []
    assert len(trading.fake.orders) == placed


async def test_each_disagreement_is_reported_with_an_alert_and_nothing_is_traded(trading):
    for name in ("MATCHED", "ORPHANED", "MISMATCH"):
        await opened(trading, name, 1)
    fake, book = trading.fake, trading.fake.book
    # The broker lost ORPHANED's position; it holds MISSING's, which the ledger never
    # opened; the ledger says 2 lots of MISMATCH where the broker holds 1.
    book[("ORPHANED29DEC26FUT", "NFO", "NRML")].quantity = 0
    book[("MISSING29DEC26FUT", "NFO", "NRML")] = Position(quantity=75, average_price=100.0)
    await trading.gw.query("update gateway.positions set lots = 2 where instrument = 'MISMATCH'")
    placed, positions = len(fake.orders), {k: p.quantity for k, p in book.items()}

    expected = [
        {"instrument": "MATCHED", "outcome": "matched", "ledger": 75, "broker": 75},
        {"instrument": "MISMATCH", "outcome": "quantity_mismatch", "ledger": 150, "broker": 75},
        {"instrument": "MISSING", "outcome": "missing", "ledger": 0, "broker": 75},
        {"instrument": "ORPHANED", "outcome": "orphaned", "ledger": 75, "broker": 0},
    ]
    run = await reconcile_over_http(trading)
    assert (run["status"], run["outcome"]) == ("mismatch", "mismatch"), run
    assert run["items"] == expected
    code, run = await reconcile_with_the_cli(trading)
    assert (code, run["outcome"], run["items"]) == (1, "mismatch", expected)

    alerts = await trading.gw.query(
        "select kind, detail from gateway.alerts where kind like 'reconciliation%%' order by id"
    )
    assert alerts == 2 * [
        ("reconciliation_quantity_mismatch", "MISMATCH: ledger 150, broker 75"),
        ("reconciliation_missing", "MISSING: ledger 0, broker 75"),
        ("reconciliation_orphaned", "ORPHANED: ledger 75, broker 0"),
    ]
    # Reported, never repaired: no order placed, no position moved at the broker.
    assert len(fake.orders) == placed
    assert {k: p.quantity for k, p in book.items()} == positions


async def test_every_new_leader_reconciles_by_itself(dsn, tmp_path):
    async with trading_at(dsn, tmp_path, INSTRUMENTS, nodes=2) as t:
        await opened(t, "MATCHED", 1)
        first = t.node
        second = next(n for n in t.gw.nodes.values() if n is not first)
        runs_of_epoch = (
            "select trigger, instance_id, items from gateway.reconciliations"
            " where epoch = %s and outcome is not null order by id"
        )
        any_run = "select count(*) > 0 from gateway.reconciliations where epoch = %s"
        # Leadership goes to the other instance, then back to the first one.
        for leader in (second, first):
            resigning = next(n for n in t.gw.nodes.values() if n is not leader)
            status, answer = await t.gw.admin(resigning, "/coordinator/resign")
            assert status == 200, answer
            assert await t.gw.leader() is leader
            epoch = answer["epoch"] + 1
            await until(query_true(t.gw, any_run, epoch))  # an epoch is written when a run ends
            runs = await t.gw.query(runs_of_epoch, epoch)
            assert runs[0] == (
                "elected",
                leader.instance_id,
                [{"instrument": "MATCHED", "outcome": "matched", "ledger": 75, "broker": 75}],
            ), (leader.instance_id, epoch, runs)
        assert t.orders("MATCHED") == [("BUY", 75)]  # its own order, and nothing more
