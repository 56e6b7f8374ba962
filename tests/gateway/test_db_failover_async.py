"""A failover to an asynchronous standby that lost the last commits, with real servers.

The hazard, built deterministically: a primary streams to an asynchronous standby;
a signal waits pending (the broker refuses our key) and is replicated; the standby
is cut off (stopped cleanly); on the primary alone the leader dies (a new epoch the
standby never sees), the waiting signal executes and another is answered 2xx and
executed (orders at the fake OpenAlgo, rows the standby never sees). Then the
primary crashes and the stale standby is promoted: it still shows the first signal
pending, lacks the second and the new epoch, and would hand that epoch number out
again.

The defence (service/watermark.py): every surviving instance finds, on reconnecting,
that the database lacks what it saw, and the kill switch goes to 'rewound'. Nothing
reaches the broker, neither the signal the promoted database still shows pending
(re-sent, it would open the position a second time) nor new webhooks, until an
operator, having reconciled, runs `pgleader resume --after-rewind --open end` (the
pending signal from before the rewind is ended, never sent; without --open the resume
refuses and names it); a plain resume changes nothing. No order reaches the broker
twice in the whole test.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgleader.migrations import migrate
from tests.support.gateway import (
    Cluster,
    GatewayProcess,
    Trading,
    eventually,
    futures,
    pgleader_cli,
    query_true,
    trading_at,
    until,
)
from tests.support.replication import ReplicatedPostgres, replicated_postgres

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="function")]

# One instrument per signal: each order is told apart by its symbol at the broker.
# BEFORE: executed and replicated. HELD: pending when the standby is cut off, executed
# on the primary alone. LOST: stored and executed on the primary alone. AFTER, AFTER2:
# webhooks to the promoted database. NEW: after `resume --after-rewind`.
TRADED = futures("BEFORE", "HELD", "LOST", "AFTER", "AFTER2", "NEW")
REWOUND_LOG = "database went back in time: trading halted"


@pytest.fixture
def pair() -> Iterator[ReplicatedPostgres]:
    with replicated_postgres(synchronous=False) as started:
        yield started


def _sync_query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params or None).fetchall()


async def _leading(gw: Cluster) -> tuple[GatewayProcess, int]:
    """The live instance whose session holds the lock, and its epoch."""
    found: list[tuple[GatewayProcess, int]] = []

    async def held() -> bool:
        rows = await gw.query(
            "select leader, epoch from pgleader.leader where election = 'gateway' and lock_held"
        )
        if rows and rows[0][0] in gw.nodes and gw.nodes[rows[0][0]].proc.returncode is None:
            found[:] = [(gw.nodes[rows[0][0]], int(rows[0][1]))]
            return True
        return False

    await until(held, 30)
    return found[0]


def _mark(gw: Cluster, node: GatewayProcess) -> dict[str, Any]:
    """The instance's watermark as saved in its data directory ({} before the first save)."""
    path = gw.data_dir / "watermark" / f"{node.instance_id}.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _logged(node: GatewayProcess, event: str) -> list[dict[str, Any]]:
    lines = []
    for line in Path(node.log_path).read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            lines.append(entry)
    return lines


def _orders_by_symbol(t: Trading) -> dict[str, int]:
    return dict(Counter(o.symbol for o in t.fake.orders))


async def test_a_standby_that_lost_commits_is_promoted_and_nothing_is_sent_until_resumed(
    pair: ReplicatedPostgres, tmp_path: Path
):
    await migrate(pair.dsn)
    async with trading_at(pair.dsn, tmp_path, TRADED, nodes=3) as t:
        gw = t.gw
        symbol = {name: traded.symbol for name, traded in TRADED.items()}
        first, first_epoch = await _leading(gw)

        # Replicated: one signal executed, one pending (the broker refuses our key: it
        # goes back to pending and the leader waits 10 s before asking again).
        status, before = await t.post(first, instrument="BEFORE", lots=1)
        assert (status, before["status"]) == (200, "executed"), before
        t.fake.faults.unauthorised = True
        status, held = await t.post(first, instrument="HELD", lots=1)
        assert (status, held["status"]) == (202, "accepted"), held
        held_id = int(held["signal_id"])
        assert await t.status(held_id) == "pending"
        await asyncio.to_thread(pair.wait_replayed)
        on_standby = _sync_query(
            pair.standby.dsn, "select status from gateway.signals where id = %s", held_id
        )
        assert on_standby == [("pending",)]

        # The standby is cut off; the primary goes on alone.
        await asyncio.to_thread(pair.stop_standby)
        t.fake.faults.unauthorised = False  # the old leader would ask again in 10 s
        first.signal(signal.SIGKILL)
        await first.wait()
        second, second_epoch = await _leading(gw)
        assert second is not first and second_epoch > first_epoch
        await t.reaches(held_id, "executed", timeout=30)  # the new leader sweeps it
        follower = next(n for n in gw.nodes.values() if n not in (first, second))
        status, lost = await t.post(follower, instrument="LOST", lots=1)
        assert (status, lost["status"]) == (202, "accepted"), lost
        lost_id = int(lost["signal_id"])
        await t.reaches(lost_id, "executed")
        # What each survivor saw is on disk (saved at most once a second).
        await eventually(lambda: _mark(gw, second).get("epoch") == second_epoch)
        await eventually(
            lambda: (
                _mark(gw, follower).get("epoch") == second_epoch
                and _mark(gw, follower).get("signal_id") == lost_id
            )
        )
        sent_before = _orders_by_symbol(t)
        assert sent_before == {symbol["BEFORE"]: 1, symbol["HELD"]: 1, symbol["LOST"]: 1}

        # The primary crashes; the stale standby comes back and is promoted.
        await asyncio.to_thread(pair.stop_primary)
        await asyncio.to_thread(pair.start_standby)

        # (a) The hazard is real: the standby (read-only until promoted) lacks the new
        # epoch and the signal LOST, and still shows HELD pending.
        standby = pair.standby.dsn
        (epochs,) = _sync_query(
            standby,
            "select max(epoch), count(*) filter (where epoch = %s and instance_id = %s)"
            " from pgleader.leadership_history where election = 'gateway'",
            second_epoch, second.instance_id,
        )  # fmt: skip
        assert epochs == (first_epoch, 0), epochs
        signals = dict(
            _sync_query(
                standby,
                "select id, status from gateway.signals where id = any(%s)",
                [int(before["signal_id"]), held_id, lost_id],
            )
        )
        assert signals == {int(before["signal_id"]): "executed", held_id: "pending"}, signals
        await asyncio.to_thread(pair.promote)

        # (b) The defence: every survivor finds the database rewound; trading stops.
        await until(query_true(gw, "select mode = 'rewound' from gateway.trading_halt"), 30)
        why = await gw.scalar("select reason from gateway.trading_halt")
        assert "lacks" in why, why
        assert await gw.alerts("database_rewound"), "no database_rewound alert"
        # Each finds what it saw missing: the epoch, or (should the lost epoch's number
        # have been handed out again to the same leader meanwhile) the signal it answered.
        lacks_epoch = f"lacks epoch {second_epoch} of {second.instance_id}"
        lacks_signal = f"lacks signal {lost_id},"
        for node, seen in ((second, (lacks_epoch,)), (follower, (lacks_epoch, lacks_signal))):
            await eventually(lambda node=node: bool(_logged(node, REWOUND_LOG)), 30)
            reasons = [str(entry.get("reason")) for entry in _logged(node, REWOUND_LOG)]
            assert any(s in r for r in reasons for s in seen), (node.instance_id, reasons)

            async def says_why(node: GatewayProcess = node) -> bool:
                return await gw.get(node, "/ready") == (200, {"status": "database_rewound"})

            await until(says_why, 30)

        # A leader on the promoted database takes new webhooks and keeps them, with
        # HELD, pending: none reaches the broker while its sweeps claim them.
        leader, _ = await _leading(gw)
        other = next(n for n in (second, follower) if n is not leader)
        status, after = await t.post(leader, instrument="AFTER", lots=1)  # tried inline
        assert (status, after["status"]) == (202, "accepted"), after
        status, after2 = await t.post(other, instrument="AFTER2", lots=1)
        assert (status, after2["status"]) == (202, "accepted"), after2
        waiting = [held_id, int(after["signal_id"]), int(after2["signal_id"])]
        batches = await _batches(gw, leader)

        async def claimed_again() -> bool:  # every sweep claims what is pending
            return await _batches(gw, leader) >= batches + 3

        await until(claimed_again, 30)
        rows = await gw.query("select id, status from gateway.signals where id = any(%s)", waiting)
        assert dict(rows) == dict.fromkeys(waiting, "pending"), rows
        assert _orders_by_symbol(t) == sent_before

        # A plain resume changes nothing; the operator reconciles with the broker.
        code, out, err = await pgleader_cli("resume", "--dsn", pair.dsn)
        assert code == 1 and out == "" and "--after-rewind" in err, (code, out, err)
        assert await t.halt_mode() == "rewound"
        code, out, err = await pgleader_cli("reconcile", "--dsn", pair.dsn, "--timeout", "20")
        assert code == 1, (code, out, err)
        items = {
            i["instrument"]: (i["outcome"], i["ledger"], i["broker"])
            for i in json.loads(out)["items"]
        }
        assert items["HELD"] == ("missing", 0, 75) and items["LOST"] == ("missing", 0, 75), items
        assert _orders_by_symbol(t) == sent_before

        # HELD is open in the promoted database but was executed by the lost commits:
        # --after-rewind alone refuses, naming it (sent again, it would repeat an order;
        # had an exit on the lost primary brought the broker back to flat, no position
        # check could tell). The operator ends it: never sent; the webhooks kept since the
        # rewind go, a new signal executes once.
        code, out, err = await pgleader_cli("resume", "--after-rewind", "--dsn", pair.dsn)
        assert code == 1 and out == "" and err.count("\n") == 1, (code, out, err)
        assert f"(ids {held_id})" in err and "--open end" in err, err
        assert await t.halt_mode() == "rewound"
        code, out, err = await pgleader_cli(
            "resume", "--after-rewind", "--open", "end", "--dsn", pair.dsn
        )
        assert code == 0, err
        resumed = json.loads(out)
        assert (resumed["before"], resumed["open_signals"]) == ("rewound", [held_id]), resumed
        settled = await gw.settled(waiting, timeout=30)
        assert settled == {
            held_id: "rejected", int(after["signal_id"]): "executed",
            int(after2["signal_id"]): "executed",
        }, settled  # fmt: skip
        status, new = await t.post(leader, instrument="NEW", lots=1)
        assert (status, new["status"]) == (200, "executed"), new

        assert _orders_by_symbol(t) == {symbol[name]: 1 for name in TRADED}, t.fake.orders


async def _batches(gw: Cluster, node: GatewayProcess) -> int:
    status, view = await gw.get(node, "/coordinator/leader")
    assert status == 200, view
    return int(view["metrics"]["execution_batches"]["batches"])
