"""The short, fixed-seed chaos campaign that `make test` runs (`make chaos` runs long ones),
and the checker's rules on made-up histories."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from tests.chaos.broker import Traded
from tests.chaos.checker import (
    FAKE_TIME,
    OrderRow,
    RollRow,
    SignalRow,
    broker_promise,
    check,
    failover_figures,
    no_lead_promise,
    redis_figures,
    rollover_promise,
    transfer_promise,
    waiter_promise,
)
from tests.chaos.database import FailoverPair
from tests.chaos.harness import (
    DISK_FULL_NODE,
    FAULTS,
    TRANSFER_FAULTS,
    Failover,
    History,
    PausedWaiter,
    Request,
    Transfer,
    campaign,
    summary,
)

# skipped when no leader is alive (pause_waiter: or no follower waits on the lock)
LEADER_FAULTS = {"kill", "pause", "pause_waiter", "partition", "sigterm"}


async def test_short_campaign_keeps_every_promise_under_every_fault_kind():
    result = await campaign(seed=20261123, duration=40, faults=len(FAULTS), rate=5)
    print(summary(result))
    assert {kind for _, kind, _ in result["faults"]} >= set(FAULTS) - LEADER_FAULTS
    assert result["accepted"] > 100 and result["executed"] > 30
    disk_full = result["disk_full"]
    assert any(a.startswith("503") for a in disk_full["full"]), "the full disk refused nothing"
    assert disk_full["freed"].get("202 spooled"), "nothing spooled once the disk was freed"
    broker = result["broker"]
    assert result["moves"].get("reversal") and result["moves"].get("partial_exit")
    assert broker["fills"] > 30 and broker["both_ways"] >= 2, "the book did not move both ways"
    assert result["rollovers"]["states"].get("rolled"), "no future was rolled"
    transfers = result["transfers"]
    assert {t["kind"] for t in transfers} == set(TRANSFER_FAULTS)
    assert {t["via"] for t in transfers} == {"http", "cli"}, "both ways of asking"
    no_lead = result["no_lead"]
    assert no_lead["answered_2xx"] > 20 and no_lead["executed"] > 10, no_lead
    (failover,) = result["failovers"]  # one db_failover, its standby rebuilt
    assert failover["promote_to_elected_s"] is not None and failover["rebuilt_s"], failover
    assert result["redis"]["planted"], "redis_garbage planted no fingerprint"
    assert result["violations"] == [], summary(result)


async def test_checker_names_a_signal_answered_spooled_that_never_reached_the_inbox(
    dsn: str, tmp_path: Path
):
    """The disk_full fault's failure: a 202 `spooled` whose record was torn on a full disk.
    A 503 on the same disk promised nothing and is no loss."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / f"{DISK_FULL_NODE}.jsonl").write_text('{"body":{},"fingerprint":"f00d')  # torn
    node = SimpleNamespace(data_dir=tmp_path, log_path=tmp_path / f"{DISK_FULL_NODE}.log")
    history = History(seed=1)
    now = time.monotonic()
    history.requests += [
        Request(now, DISK_FULL_NODE, "f00d", 202, {"status": "spooled"}, now),
        Request(now, DISK_FULL_NODE, "beef", 503, {"status": "unavailable"}, now),
    ]

    async def empty_book() -> dict[str, Any]:
        return {"positions": [], "max_abs_positions": {}, "orders": []}

    fake = SimpleNamespace(
        seed=1,
        server=SimpleNamespace(dsn=dsn),
        workdir=tmp_path,
        nodes={DISK_FULL_NODE: node},
        history=history,
        disk=None,
        broker=SimpleNamespace(state=empty_book),
        instruments={},
    )

    result = await check(fake, quiet=0)  # type: ignore[arg-type]

    lost = [v for v in result["violations"] if v.startswith("no-loss")]
    assert len(lost) == 1 and "f00d answered 202" in lost[0], result["violations"]
    assert str(spool / f"{DISK_FULL_NODE}.jsonl") in lost[0]  # where its remains are
    assert result["spooled_answers"] == 1 and result["accepted"] == 1


# -- the broker promise, on made-up books -------------------------------------------

NIFTY = Traded("NIFTY", "NFO", "NIFTY29DEC26FUT", "NRML", 75, 6)


def _fill(orderid: str, action: str, quantity: int) -> dict[str, Any]:
    return {
        "orderid": orderid, "symbol": NIFTY.symbol, "exchange": NIFTY.exchange,
        "product": NIFTY.product, "action": action, "quantity": quantity,
    }  # fmt: skip


def _promise(
    signals: dict[int, SignalRow],
    orders: list[OrderRow],
    fills: list[dict[str, Any]],
    open_lots: int,
    alerted: set[int] | None = None,
) -> dict[str, Any]:
    filled = [f for f in fills if f.get("status", "complete") == "complete"]
    position = sum((1 if f["action"] == "BUY" else -1) * f["quantity"] for f in filled)
    highest, running = 0, 0
    for f in filled:
        running += (1 if f["action"] == "BUY" else -1) * f["quantity"]
        highest = max(highest, abs(running))
    book = {
        "positions": [
            {"symbol": NIFTY.symbol, "exchange": "NFO", "product": "NRML", "quantity": position}
        ],
        "max_abs_positions": {NIFTY.symbol: highest},
        "orders": fills,
    }
    ledger = [("NIFTY", "long", open_lots)] if open_lots else []
    return broker_promise({"NIFTY": NIFTY}, signals, orders, ledger, alerted or set(), book)


def test_a_target_order_sent_again_after_settling_is_no_duplicate():
    """The first try got a 5xx before it was applied, was settled (requeued), then went
    again with the same target: two orders booked, one fill, the ledger at the target."""
    signals = {1: SignalRow("NIFTY", "executed", None)}
    orders = [
        OrderRow(1, "pgl-1-e1-1", "not_sent", None, 0, 150),
        OrderRow(1, "pgl-1-e1-2", "filled", "B1", 0, 150),
    ]
    result = _promise(signals, orders, [_fill("B1", "BUY", 150)], open_lots=2)
    assert result["violations"] == []
    assert result["instruments"]["NIFTY"]["position"] == "matched"


def test_an_order_the_broker_rejected_after_its_orderid_is_no_fill():
    """broker_reject: the entry's order is in the book as rejected, the signal failed;
    the same target went again for the next signal and filled once."""
    signals = {1: SignalRow("NIFTY", "failed", None), 2: SignalRow("NIFTY", "executed", None)}
    orders = [
        OrderRow(1, "pgl-1-e1-1", "rejected", "B1", 0, 150),
        OrderRow(2, "pgl-2-e1-1", "filled", "B2", 0, 150),
    ]
    rejected = _fill("B1", "BUY", 150) | {"status": "rejected"}
    result = _promise(signals, orders, [rejected, _fill("B2", "BUY", 150)], open_lots=2)
    assert result["violations"] == [], result["violations"]
    assert result["instruments"]["NIFTY"]["fills"] == 1
    # Were it counted as a fill, the book would be at 300.
    counted = _promise(signals, orders, [rejected | {"status": "complete"}, _fill("B2", "BUY", 150)],
                       open_lots=2)  # fmt: skip
    assert any("exposure" in v for v in counted["violations"]), counted["violations"]


def test_a_fill_that_doubled_the_exposure_is_named_three_ways():
    """An entry that reached the broker twice as a delta: 150 then 300, 150 targeted."""
    signals = {1: SignalRow("NIFTY", "executed", None)}
    orders = [OrderRow(1, "pgl-1-e1-1", "filled", "B1", 0, 150)]
    fills = [_fill("B1", "BUY", 150), _fill("B2", "BUY", 150)]
    violations = _promise(signals, orders, fills, open_lots=2)["violations"]
    assert any("landing" in v and "at 300" in v for v in violations), violations
    assert any("exposure" in v and "|300|" in v and "|150|" in v for v in violations)
    assert any("position" in v and "holds 300, the ledger 150" in v for v in violations)
    assert any("fills: 2 fills" in v for v in violations)


def test_a_position_that_differs_passes_only_with_an_alerted_in_doubt_signal():
    """Applied after the client gave up, the broker unreachable while settling: in_doubt.
    With its alert the difference is reported, not passed as matched; without, named."""
    signals = {
        1: SignalRow("NIFTY", "executed", None),
        2: SignalRow("NIFTY", "in_doubt", "NFO:NIFTY29DEC26FUT:NRML: the broker cannot tell"),
    }
    orders = [
        OrderRow(1, "pgl-1-e1-1", "filled", "B1", 0, 75),
        OrderRow(2, "pgl-2-e1-1", "unknown", None, 75, 225),
    ]
    fills = [_fill("B1", "BUY", 75), _fill("B2", "BUY", 150)]

    reported = _promise(signals, orders, fills, open_lots=1, alerted={1, 2})
    assert reported["violations"] == []
    assert reported["instruments"]["NIFTY"]["position"] == "differs, in_doubt"
    assert reported["in_doubt"] == [(2, "NIFTY", True, signals[2].detail)]

    silent = _promise(signals, orders, fills, open_lots=1, alerted={1})
    assert [v for v in silent["violations"] if "without an alert" in v]

    signals[2] = SignalRow("NIFTY", "executed", None)
    orders[1] = OrderRow(2, "pgl-2-e1-1", "rejected", None, 75, 225)
    named = _promise(signals, orders, fills, open_lots=1, alerted={1, 2})["violations"]
    assert any("no signal of it is in_doubt" in v for v in named), named


# -- the rollover promise, on made-up rolls -------------------------------------------

FUTURE = Traded(
    "FINNIFTY1!", "NFO", "FINNIFTY", "NRML", 65, 6, (date(2026, 12, 5), date(2027, 1, 4))
)
NAME = FUTURE.name
NEAR, NEXT = (f"NFO:{symbol}:NRML" for symbol in FUTURE.contracts)
T0 = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _contract_fill(
    orderid: str, where: str, action: str, quantity: int, at: float
) -> dict[str, Any]:
    stamp = _at(at).astimezone(FAKE_TIME).strftime("%Y-%m-%d %H:%M:%S")
    return {
        "orderid": orderid, "symbol": where.split(":")[1], "exchange": "NFO", "product": "NRML",
        "action": action, "quantity": quantity, "timestamp": stamp,
    }  # fmt: skip


def _book(fills: list[dict[str, Any]]) -> dict[str, Any]:
    held: dict[str, int] = {}
    for f in fills:
        held[f["symbol"]] = (
            held.get(f["symbol"], 0) + (1 if f["action"] == "BUY" else -1) * f["quantity"]
        )
    positions = [
        {"symbol": symbol, "exchange": "NFO", "product": "NRML", "quantity": n}
        for symbol, n in held.items()
    ]
    return {"positions": positions, "max_abs_positions": {}, "orders": fills}


def test_a_roll_that_exits_twice_or_lets_a_signal_through_is_named():
    """A long of 2 lots (130) rolled from NEAR to NEXT between +0 s and +2 s: its exit's
    answer was lost (its fill has no id on record), then a pyramid that waited behind
    the roll went to NEXT."""
    roll = RollRow(1, NAME, NEAR, NEXT, "long", 2, "rolled", None, _at(0), _at(2))
    signals = {
        1: SignalRow(NAME, "executed", None, _at(-5)),
        2: SignalRow(NAME, "executed", None, _at(1)),
    }
    orders = [
        OrderRow(1, "pgl-1-e1-1", "filled", "B1", 0, 130, NAME, NEAR, None, _at(-4)),
        OrderRow(None, "pgl-roll1-exit-e1-1", "unknown", None, 130, 0, NAME, NEAR, 1, _at(0.1)),
        OrderRow(None, "pgl-roll1-entry-e1-2", "filled", "B3", 0, 130, NAME, NEXT, 1, _at(1)),
        OrderRow(2, "pgl-2-e1-1", "filled", "B4", 130, 195, NAME, NEXT, None, _at(3)),
    ]  # fmt: skip
    fills = [
        _contract_fill("B1", NEAR, "BUY", 130, -4),
        _contract_fill("B2", NEAR, "SELL", 130, 0.2),
        _contract_fill("B3", NEXT, "BUY", 130, 1),
        _contract_fill("B4", NEXT, "BUY", 65, 3),
    ]
    clean = rollover_promise(signals, orders, [roll], _book(fills))
    assert clean["violations"] == []
    (row,) = clean["rolls"]
    assert (row["exit"]["fills"], row["entry"]["fills"], row["waited"]) == (1, 1, 1)

    # The exit sent again on a flat NEAR: the sandbox's quirk makes it a plain order.
    again = [*fills[:2], _contract_fill("B5", NEAR, "SELL", 130, 0.5), *fills[2:]]
    named = rollover_promise(signals, orders, [roll], _book(again))["violations"]
    assert any("placed 2 exit orders" in v for v in named), named
    assert any(f"still holds -130 of {NEAR}" in v for v in named), named

    # The pyramid claimed while the roll was still active.
    orders[3] = orders[3]._replace(claimed=_at(1.5))
    named = rollover_promise(signals, orders, [roll], _book(fills))["violations"]
    assert any(f"signal 2 of {NAME} claimed at" in v for v in named), named


def test_a_fill_of_a_signal_order_with_no_broker_id_in_the_rolls_last_second_is_not_its():
    """The roll ends at +2.5 s; the pyramid that waited behind it is claimed at +2.6 s,
    its answer lost (settled: the broker at its target, no broker id on record), and
    the fake stamps its fill +2 s (whole seconds): inside the roll's window."""
    roll = RollRow(1, NAME, NEAR, NEXT, "long", 2, "rolled", None, _at(0), _at(2.5))
    signals = {1: SignalRow(NAME, "executed", None, _at(-5)), 2: SignalRow(NAME, "executed", None)}
    orders = [
        OrderRow(1, "pgl-1-e1-1", "filled", "B1", 0, 130, NAME, NEAR, None, _at(-4)),
        OrderRow(None, "pgl-roll1-exit-e1-1", "filled", "B2", 130, 0, NAME, NEAR, 1, _at(0.1)),
        OrderRow(None, "pgl-roll1-entry-e1-2", "filled", "B3", 0, 130, NAME, NEXT, 1, _at(1)),
        OrderRow(2, "pgl-2-e1-1", "filled", None, 130, 195, NAME, NEXT, None, _at(2.6)),
    ]  # fmt: skip
    fills = [
        _contract_fill("B1", NEAR, "BUY", 130, -4),
        _contract_fill("B2", NEAR, "SELL", 130, 0.2),
        _contract_fill("B3", NEXT, "BUY", 130, 1),
        _contract_fill("B4", NEXT, "BUY", 65, 2.7),
    ]
    assert rollover_promise(signals, orders, [roll], _book(fills))["violations"] == []
    # Had the pyramid's broker id been lost and not its order, B4 would be the roll's.
    orders[3] = orders[3]._replace(outcome="rejected")
    (named,) = rollover_promise(signals, orders, [roll], _book(fills))["violations"]
    assert named.startswith(f"rollover: roll 1 of {NAME} placed 2 entry orders"), named
    assert "B4 BUY 65 at" in named and "no broker id: 0" in named


def test_a_roll_that_enters_before_it_exits_is_double_exposure():
    """The book of a future is the sum over its contracts: 130 in each at once is |260|."""
    signals = {1: SignalRow(NAME, "executed", None)}
    orders = [
        OrderRow(1, "pgl-1-e1-1", "filled", "B1", 0, 130, NAME, NEAR),
        OrderRow(None, "pgl-roll1-entry-e1-1", "filled", "B2", 0, 130, NAME, NEXT, 1),
        OrderRow(None, "pgl-roll1-exit-e1-2", "filled", "B3", 130, 0, NAME, NEAR, 1),
    ]
    fills = [
        _contract_fill("B1", NEAR, "BUY", 130, -4),
        _contract_fill("B2", NEXT, "BUY", 130, 0.2),
        _contract_fill("B3", NEAR, "SELL", 130, 0.5),
    ]
    result = broker_promise({NAME: FUTURE}, signals, orders, [(NAME, "long", 2)], set(),
                            _book(fills))  # fmt: skip
    assert result["instruments"][NAME]["position"] == "matched"
    assert any("exposure" in v and "|260|" in v for v in result["violations"]), result


# -- the no-lead and transfer promises, on made-up switchovers ---------------------


def test_an_instance_that_may_not_lead_is_named_when_it_led_or_booked_an_order():
    assert no_lead_promise("gw4", [], 0, 0) == []
    led, booked = no_lead_promise("gw4", [7], 3, 2)
    assert "led epoch(s) 7" in led and "claimed 3 signal(s) and booked 2 order(s)" in booked


def _transfer(kind: str, to: str, answer: str, said: str = "{}", **outcome: Any) -> Transfer:
    return Transfer(kind, "http", to, "gw1", 5, answer, said, **outcome)


def test_a_switchover_that_elected_another_or_changed_a_refusing_leader_is_named():
    live = _transfer("transfer_live", "gw2", "accepted", elections=[("gw2", 6, 0.04)])
    dead = _transfer("transfer_dead", "gw3", "refused", after=(5, "gw1"),
                     said="instance gw3 is not alive (last heartbeat 0.3 s ago)")  # fmt: skip
    lost = _transfer("transfer_dead", "gw3", "accepted", elections=[("gw2", 6, 2.6)])
    ineligible = _transfer("transfer_ineligible", "gw4", "refused", after=(5, "gw1"),
                           said="instance gw4 may not lead (it runs with --no-lead)")  # fmt: skip
    assert transfer_promise([live, dead, lost, ineligible]) == []

    named = transfer_promise([
        replace(live, elections=[("gw3", 6, 0.05)]),  # another follower took the lead
        replace(live, answer="409 not_leader", elections=[]),
        replace(lost, elections=[], waited=17.4),  # nobody led after the bound
        replace(ineligible, after=(6, "gw2")),  # refused, yet the leader resigned
        replace(ineligible, said="may not lead\nTraceback"),
        replace(ineligible, answer="accepted", after=None, elections=[("gw4", 6, 0.1)]),
        # the killed target's session, still waiting on the lock, won it
        replace(lost, elections=[("gw3", 6, 0.02), ("gw2", 7, 0.4)]),
    ])  # fmt: skip
    assert len(named) == 7, named
    assert "then gw3 elected" in named[0] and "answered 409 not_leader" in named[1]
    assert "no other instance elected within 17.4 s: leaderless for good" in named[2]
    assert "the leadership changed: epoch 6 led by gw2" in named[3]
    assert "not in one line" in named[4] and "may not lead, answered accepted" in named[5]
    assert "the killed target was elected (epoch 6, 0.02 s after" in named[6]


# -- the campaign's database, and the failover and redis figures ---------------------


def test_the_campaign_database_fails_over_again_and_again_keeping_every_commit():
    """Each failover promotes a synchronous standby (in the other slot each time) and
    a rebuilt one takes its place: the multi-host DSN reaches the new primary, and
    every commit acknowledged before a crash is there."""
    root = Path(tempfile.mkdtemp(prefix="pgleader-chaos-pair-"))
    root.chmod(0o755)  # the postgres user must pass through (pytest's tmp_path is 700)
    pair = FailoverPair(root)
    try:
        pair.create()
        with psycopg.connect(pair.dsn, autocommit=True) as conn:
            conn.execute("create table kept (n int)")
            conn.execute("insert into kept values (0)")
        for n in (1, 2):
            before = pair.primary.port
            pair.crash_primary()
            pair.promote()
            with psycopg.connect(pair.dsn, autocommit=True) as conn:
                row = conn.execute("select inet_server_port(), pg_is_in_recovery()").fetchone()
                assert row == (next(p for p in pair.ports if p != before), False)
                conn.execute("insert into kept values (%s)", [n])
            assert pair.rebuild() > 0 and pair.standby is not None
            assert pair.standby.port == before  # the crashed node's slot
        with psycopg.connect(pair.dsn, autocommit=True) as conn:
            assert conn.execute("select array_agg(n order by n) from kept").fetchone() == (
                [0, 1, 2],
            )
    finally:
        pair.close()
        shutil.rmtree(root, ignore_errors=True)


async def test_a_failover_after_which_nobody_led_is_named(db: psycopg.AsyncConnection[Any]):
    """Its figures come from the first election after the crash (epoch 5, 1 s after
    `pg_ctl promote` was asked); a failover with no election after it is a violation."""
    now = time.time()
    await db.execute("insert into pgleader.election (name) values ('gateway')")
    await db.execute(
        "insert into pgleader.leadership_history"
        " (election, epoch, instance_id, acquired_at, released_at)"
        " values ('gateway', 4, 'gw1', to_timestamp(%s), to_timestamp(%s)),"
        "        ('gateway', 5, 'gw2', to_timestamp(%s), null)",
        [now - 60, now - 10.5, now - 8],
    )
    (row,), violations = await failover_figures(db, [Failover(now - 10, now - 9, now - 8.5, 1, 2)])
    assert violations == []
    assert (row["epoch_before"], row["epoch"], row["leader"]) == (4, 5, "gw2")
    assert row["promote_to_elected_s"] == pytest.approx(1.0, abs=0.01)

    (row,), violations = await failover_figures(db, [Failover(now - 5, now - 4, now - 3, 2, 1)])
    assert row["epoch"] is None and row["promote_to_elected_s"] is None
    assert violations == [
        "failover: the primary :2 crashed, :1 promoted; nobody was elected after it"
    ]


async def test_a_pause_of_the_first_waiter_after_which_nobody_else_led_is_named(
    db: psycopg.AsyncConnection[Any],
):
    """Another instance must be elected while the waiter stays paused. The paused one's
    session may claim for it (its epoch is recorded); with nobody else after it, that is
    a violation too."""
    now = time.time()
    await db.execute("insert into pgleader.election (name) values ('gateway')")
    await db.execute(
        "insert into pgleader.leadership_history (election, epoch, instance_id, acquired_at)"
        " values ('gateway', 4, 'gw1', to_timestamp(%s)), ('gateway', 5, 'gw3', to_timestamp(%s)),"
        "        ('gateway', 6, 'gw2', to_timestamp(%s))",
        [now - 60, now - 12, now - 3],
    )
    (row,), violations = await waiter_promise(
        db, [PausedWaiter("gw2", "gw1", now - 19.5, now - 10, granted=True)]
    )
    assert violations == []
    assert (row["elected"], row["granted_the_lock"], row["paused_instance_epoch"]) == (
        "gw3",
        True,
        None,
    )
    assert row["pause_to_elected_s"] == pytest.approx(7.5, abs=0.01)

    # gw3's session claimed for it while it was paused; gw2 followed within the pause
    (row,), violations = await waiter_promise(
        db, [PausedWaiter("gw3", "gw1", now - 13, now - 1, True)]
    )
    assert violations == []
    assert (row["elected"], row["paused_instance_epoch"]) == ("gw2", 5)

    _, violations = await waiter_promise(db, [PausedWaiter("gw2", "gw1", now - 9, now - 4, True)])
    assert violations == [
        "waiter: gw1 killed while gw2 was paused waiting on the lock (its session granted"
        " the lock): no other instance elected in the 5.0 s it was paused"
    ]
    _, violations = await waiter_promise(db, [PausedWaiter("gw3", "gw1", now - 13, now - 5, True)])
    assert violations == [
        "waiter: gw1 killed while gw3 was paused waiting on the lock (its session granted"
        " the lock): no other instance elected in the 8.0 s it was paused (the paused"
        " instance led epoch 5)"
    ]


def test_redis_figures_count_planted_signals_answered_duplicate_on_their_first_send():
    now = time.monotonic()
    requests = [
        Request(now + 1, "gw1", "a", 200, {"status": "duplicate", "signal_id": 7}, now + 1.1),
        Request(now + 2, "gw2", "a", 200, {"status": "duplicate", "signal_id": 9}, now + 2.1),
        Request(now, "gw1", "b", 202, {"status": "spooled"}, now + 0.1),
        Request(now + 3, "gw2", "b", 200, {"status": "duplicate", "signal_id": 3}, now + 3.1),
        Request(now, "gw3", "c", 200, {"status": "duplicate", "signal_id": 4}, now + 0.1),
    ]
    figures = redis_figures(requests, planted={"a", "b", "d"})
    # "b" was first answered spooled, "c" was not planted, "d" never sent
    assert figures == {"planted": 3, "answered_duplicate": ["a"]}
