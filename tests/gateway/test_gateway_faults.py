"""The gateway when the world misbehaves: database down, instance killed, orders in doubt."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from pgleader.embedded import EmbeddedPostgres
from service.brokers.paper import PaperBroker
from service.errors import BrokerUnavailable
from service.execution.executor import Executor
from service.gateway import _writable
from tests.support.gateway import Cluster, GatewayProcess, cluster, signal_body, until


@pytest.fixture
async def gw_own(own_server: EmbeddedPostgres, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(own_server.dsn, tmp_path) as c:
        yield c


@contextlib.asynccontextmanager
async def read_only(dsn: str) -> AsyncIterator[None]:
    """The server at `dsn` refuses writes (as a platform fences an old primary) until
    the block ends, whatever happens in it."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        await c.execute("alter system set default_transaction_read_only = on")
        await c.execute("select pg_reload_conf()")
    try:
        yield
    finally:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            await c.execute("set default_transaction_read_only = off")
            await c.execute("alter system reset default_transaction_read_only")
            await c.execute("select pg_reload_conf()")


async def test_database_down_spools_then_replays_once_even_across_an_instance_restart(
    gw_own, own_server
):
    (node,) = await gw_own.start(1)
    await gw_own.leader()
    own_server.stop("fast")
    body = signal_body(position="Long_spooled")
    status, answer = await gw_own.post(node, body)
    assert (status, answer["status"]) == (202, "spooled"), answer
    assert "signal_id" not in answer
    assert (await gw_own.get(node, "/ready"))[0] == 503
    # the instance dies before the database returns: the fsynced spool must survive it
    node.signal(signal.SIGKILL)
    await node.wait()
    spooled = list((gw_own.data_dir / "spool").glob("*.jsonl"))
    assert spooled and any(f.read_text().strip() for f in spooled)
    assert "secret" not in "".join(f.read_text() for f in spooled)

    own_server.start()
    (again,) = await gw_own.start(1)  # a new instance id finds the old spool too
    await gw_own.leader()
    await until(lambda: gw_own.scalar("select count(*) = 1 from gateway.signals"))
    (sid,) = [r[0] for r in await gw_own.query("select id from gateway.signals")]
    assert await gw_own.settled([sid]) == {sid: "executed"}
    assert await gw_own.broker_requests_per_signal() == {sid: 1}
    assert not any(f.exists() and f.read_text().strip() for f in spooled)  # replayed: gone
    status, answer = await gw_own.post(again, body)
    assert (status, answer["status"]) == (200, "duplicate")


async def test_a_hung_database_still_gets_every_signal_answered_within_three_seconds(
    gw_own, own_server
):
    """A database that stops answering (not refusing) must not hold the webhook past
    TradingView's 3 s: the signal is spooled, and executed once when it wakes up."""
    (node,) = await gw_own.start(1)
    await gw_own.leader()
    postmaster = own_server.postmaster_pid()
    assert postmaster is not None
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text()
    paused = [postmaster, *map(int, children.split())]
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        bodies = [signal_body(position=f"Long_hung_{n}") for n in range(3)]

        async def timed(body: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
            started = time.monotonic()
            status, answer = await gw_own.post(node, body)
            return time.monotonic() - started, status, answer

        answers = await asyncio.gather(*(timed(body) for body in bodies))
    finally:
        # Children first: a backend that had just exited is a zombie until the
        # postmaster, resumed last, reaps it (resumed first, it could reap one before
        # its SIGCONT: ESRCH).
        for pid in reversed(paused):
            os.kill(pid, signal.SIGCONT)
    for elapsed, status, answer in answers:
        assert (status, answer["status"]) == (202, "spooled"), answer
        assert elapsed < 3.0, f"answered after {elapsed:.2f} s: TradingView gave up at 3 s"
    await until(lambda: gw_own.scalar("select count(*) = 3 from gateway.signals"), timeout=30)
    ids = [r[0] for r in await gw_own.query("select id from gateway.signals")]
    # 60 s: a claim caught by the hang is settled after --broker-settle (30 s)
    assert set((await gw_own.settled(ids, timeout=60)).values()) == {"executed"}
    assert await gw_own.broker_requests_per_signal() == {sid: 1 for sid in ids}


async def test_ready_turns_503_while_the_database_is_down_and_back_after(gw_own, own_server):
    (node,) = await gw_own.start(1)
    assert (await gw_own.get(node, "/ready"))[0] == 200
    own_server.stop("immediate")
    assert await gw_own.get(node, "/ready") == (503, {"status": "database_unreachable"})
    assert (await gw_own.get(node, "/health"))[0] == 200
    own_server.start()
    await until(lambda: ready(gw_own, node))


async def ready(gw: Cluster, node) -> bool:
    return (await gw.get(node, "/ready"))[0] == 200


# -- reconciliation of signals left 'executing' (in-process executor, real database) --


class BlindBroker(PaperBroker):
    """A broker that takes orders but can never say what it holds."""

    name = "paper"

    async def positions(self, instruments):
        raise BrokerUnavailable("position book unavailable")


async def leave_executing(
    db, epoch: int, *, reached_broker: bool, set_epoch: bool = True, ago: str = "1 min"
) -> tuple[int, str]:
    """State a crashed leader of `epoch` leaves behind: claimed, order booked, maybe sent."""
    if set_epoch:
        await db.execute(
            "insert into pgleader.election (name, epoch) values ('gateway', %s)"
            " on conflict (name) do update set epoch = excluded.epoch",
            [epoch],
        )
    cur = await db.execute(
        "insert into gateway.signals (fingerprint, type, instrument, position, lots, price,"
        " signal_at, payload, received_by, status, claimed_epoch, claimed_by, claimed_at)"
        " values (md5(random()::text), 'BASE_ENTRY', 'NIFTY', 'Long_1', 2, 100, now(), '{}',"
        " 'old', 'executing', %s, 'old', now() - %s::interval) returning id",
        [epoch, ago],
    )
    (sid,) = await cur.fetchone()
    coid = f"pgl-{sid}-e{epoch}-1"
    await db.execute(
        "insert into gateway.orders (signal_id, epoch, instance_id, broker, client_order_id,"
        " action, quantity, side, lots, start_position, target_position)"
        " values (%s, %s, 'old', 'paper', %s, 'BUY', 2, 'long', 2, 0, 2)",
        [sid, epoch, coid],
    )
    if reached_broker:
        await broker_trade(db, coid, 2)
    return sid, coid


async def broker_trade(db, coid: str, quantity: int, *, ago: str = "30 s") -> None:
    """An order the paper broker placed `ago` (negative quantity: a sale)."""
    await db.execute(
        "insert into gateway.paper_broker_requests (client_order_id, instrument, action,"
        " quantity, received_at) values (%s, 'NIFTY', %s, %s, now() - %s::interval)",
        [coid, "BUY" if quantity > 0 else "SELL", abs(quantity), ago],
    )


async def reconcile_until(executor: Executor, rounds: int = 100) -> None:
    """Run reconciliation as the sweep would until it has settled something."""
    for _ in range(rounds):
        if await executor.reconcile():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("reconciliation settled nothing")


async def test_in_doubt_order_that_reached_the_broker_is_marked_executed_not_resent(
    db, executor_for
):
    sid, _coid = await leave_executing(db, 7, reached_broker=True)
    executor = await executor_for()
    assert executor.elector.epoch == 8
    await reconcile_until(executor)
    cur = await db.execute("select status from gateway.signals where id = %s", [sid])
    assert await cur.fetchone() == ("executed",)
    cur = await db.execute("select count(*) from gateway.paper_broker_requests")
    assert await cur.fetchone() == (1,)
    cur = await db.execute("select count(*) from gateway.positions where signal_id = %s", [sid])
    assert await cur.fetchone() == (1,)


async def test_order_that_never_reached_the_broker_is_requeued_and_sent_once(db, executor_for):
    sid, coid = await leave_executing(db, 7, reached_broker=False)
    executor = await executor_for()
    await reconcile_until(executor)
    assert await executor.execute(sid) == "executed"
    cur = await db.execute(
        "select client_order_id, outcome from gateway.orders where signal_id = %s order by id",
        [sid],
    )
    assert await cur.fetchall() == [(coid, "not_sent"), (f"pgl-{sid}-e8-2", "filled")]
    cur = await db.execute("select client_order_id from gateway.paper_broker_requests")
    assert await cur.fetchall() == [(f"pgl-{sid}-e8-2",)]


async def test_a_position_neither_at_the_start_nor_at_the_target_is_in_doubt(db, executor_for):
    sid, _coid = await leave_executing(db, 7, reached_broker=False)
    await broker_trade(db, "manual", 1)
    executor = await executor_for()
    await reconcile_until(executor)
    cur = await db.execute("select status, detail from gateway.signals where id = %s", [sid])
    status, detail = await cur.fetchone()
    assert status == "in_doubt"
    assert "NIFTY: expected 2 (or 0 before the order), the broker holds 1" in detail
    cur = await db.execute("select count(*) from gateway.paper_broker_requests")
    assert await cur.fetchone() == (1,)  # nothing sent by us


async def test_an_order_placed_since_the_claim_with_the_position_back_at_the_start_is_in_doubt(
    db, executor_for
):
    """Someone bought and sold since the claim: was ours one of them? Nobody can say."""
    sid, _coid = await leave_executing(db, 7, reached_broker=False)
    await broker_trade(db, "other-1", 2, ago="20 s")
    await broker_trade(db, "other-2", -2, ago="10 s")
    executor = await executor_for()
    await reconcile_until(executor)
    cur = await db.execute("select status, detail from gateway.signals where id = %s", [sid])
    status, detail = await cur.fetchone()
    assert (status, "with 2 order(s) since the claim" in detail) == ("in_doubt", True)


async def test_broker_that_cannot_tell_leaves_the_signal_in_doubt_with_an_alert(db, executor_for):
    sid, _ = await leave_executing(db, 7, reached_broker=False)
    executor = await executor_for(BlindBroker)
    await reconcile_until(executor)
    cur = await db.execute("select status from gateway.signals where id = %s", [sid])
    assert await cur.fetchone() == ("in_doubt",)
    cur = await db.execute("select kind from gateway.alerts where signal_id = %s", [sid])
    assert await cur.fetchall() == [("signal_in_doubt",)]
    cur = await db.execute("select count(*) from gateway.paper_broker_requests")
    assert await cur.fetchone() == (0,)


async def test_older_epoch_claims_wait_for_the_old_lease_before_reconciling(db, executor_for):
    await leave_executing(db, 7, reached_broker=False)
    executor = await executor_for()
    assert await executor.reconcile() == 0  # the old leader might still be sending
    await reconcile_until(executor)


async def test_a_fresh_claim_of_our_own_epoch_is_not_reconciled_while_it_may_be_sending(
    db, executor_for
):
    executor = await executor_for()
    epoch = executor.elector.epoch
    sid, _ = await leave_executing(db, epoch, reached_broker=False, set_epoch=False, ago="0 s")
    # A send of ours may still be under way: asking the broker now could race it.
    assert await executor.reconcile() == 0
    cur = await db.execute("select status from gateway.signals where id = %s", [sid])
    assert await cur.fetchone() == ("executing",)
    # Once any send of ours must have ended (broker_timeout), it is settled.
    await db.execute(
        "update gateway.signals set claimed_at = now() - interval '1 minute' where id = %s", [sid]
    )
    await reconcile_until(executor)
    assert await executor.execute(sid) == "executed"
    cur = await db.execute("select count(*) from gateway.paper_broker_requests")
    assert await cur.fetchone() == (1,)


async def test_start_up_waits_for_a_database_that_comes_up_late(gw_own, own_server):
    own_server.stop("fast")
    node = GatewayProcess(own_server.dsn, "late", gw_own.data_dir, "--startup-timeout", "60")
    gw_own.nodes[node.instance_id] = node
    starting = asyncio.create_task(node.start())
    await until(lambda: log_mentions(node, "database not reachable yet"))
    own_server.start()
    await starting
    assert await gw_own.leader() is node


async def log_mentions(node: GatewayProcess, text: str) -> bool:
    return text in node.log_tail(200)


async def test_a_server_turned_read_only_is_no_primary_signals_spool_until_it_writes_again(
    gw_own, own_server
):
    """An old primary fenced with default_transaction_read_only (as a platform does
    before it promotes another): pooled connections to it are dropped, the webhook
    spools within 3 s (never a 5xx), nobody leads; writable again, every signal is
    stored and executed once and a leader is elected."""
    node, other = await gw_own.start(2)
    leader = await gw_own.leader()
    status, answer = await gw_own.post(leader, signal_body(position="Long_before"))
    assert status in (200, 202), answer
    async with read_only(own_server.dsn):
        # Until the leader's next beat finds the server read-only, a claim may be refused
        # as read-only too (the sweep retries); then it steps down and nobody leads.
        led = "select count(*) = 0 from pgleader.leader where election = 'gateway' and lock_held"
        await until(lambda: gw_own.scalar(led), timeout=30)
        answers = []
        for n, target in enumerate((node, other, node, other)):
            started = time.monotonic()
            status, answer = await gw_own.post(target, signal_body(position=f"Long_ro_{n}"))
            answers.append((time.monotonic() - started, status, answer.get("status")))
        assert [(s, a) for _, s, a in answers] == [(202, "spooled")] * 4, answers
        assert max(elapsed for elapsed, _, _ in answers) < 3.0, answers
    await gw_own.leader()
    every = "select count(*) = 5 from gateway.signals"
    try:  # the spooled signals replayed
        await until(lambda: gw_own.scalar(every), timeout=30)
    except TimeoutError:
        raise AssertionError(node.log_tail(40) + "\n-----\n" + other.log_tail(40)) from None
    ids = [r[0] for r in await gw_own.query("select id from gateway.signals")]
    # 60 s: a claim refused half-way as read-only settles after --broker-settle (30 s)
    assert set((await gw_own.settled(ids, timeout=60)).values()) == {"executed"}
    assert await gw_own.broker_requests_per_signal() == {sid: 1 for sid in ids}


async def test_the_pool_drops_a_connection_to_a_server_that_turned_read_only(own_server):
    """No round trip: the server reports the change (ParameterStatus) with its next
    answer on that connection, and the pool drops it when it comes back."""
    pool = AsyncConnectionPool(own_server.dsn, min_size=1, max_size=1, open=False,
                               kwargs={"autocommit": True}, reset=_writable)  # fmt: skip
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            first = conn.info.backend_pid
        async with read_only(own_server.dsn), pool.connection() as conn:
            assert conn.info.backend_pid == first  # it had not heard of it yet
            async with asyncio.timeout(10):  # once the backend has read the new setting,
                while conn.info.parameter_status("default_transaction_read_only") != "on":
                    await conn.execute("select 1")  # an answer carries the news
        async with pool.connection(timeout=10) as conn:
            assert conn.info.backend_pid != first  # dropped: a new session
    finally:
        await pool.close()
