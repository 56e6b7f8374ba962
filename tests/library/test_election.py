"""The election against a real PostgreSQL: one leader, epochs, hand-over, fencing."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest

from pgleader import Elector, Fenced, NotLeader, Timings, check_epoch

FAST = Timings(heartbeat=0.2, lease=0.5, evict_after=1.0)


@pytest.fixture
async def electors(dsn: str) -> AsyncIterator[Callable[..., Any]]:
    """Factory of started electors on this test's database; all stopped at the end."""
    started: list[Elector] = []

    async def make(n: int, election: str = "main", **kwargs: Any) -> list[Elector]:
        kwargs.setdefault("timings", FAST)
        kwargs.setdefault("resign_cooldown", 0.05)
        batch = [
            Elector(dsn, election, instance_id=f"{election}-{len(started) + i}", **kwargs)
            for i in range(n)
        ]
        for e in batch:
            await e.start()
        started.extend(batch)
        return batch

    yield make
    await asyncio.gather(*(e.stop() for e in started))


async def first_leader(electors: list[Elector], timeout: float = 10) -> Elector:
    """The elector that wins next; waits on their leadership events, not on a clock."""
    waits = {asyncio.ensure_future(e.wait_for_leadership()): e for e in electors}
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
    finally:
        for w in waits:
            w.cancel()
    assert done, f"no leader among {len(electors)} electors within {timeout} s"
    return waits[done.pop()]


async def observe(db: psycopg.AsyncConnection[Any], election: str = "main") -> dict[str, Any]:
    """The operator's view next to raw pg_locks, read in one statement."""
    cur = await db.execute(
        """
        select v.epoch, v.leader, v.backend_pid, v.lock_held,
               (select array_agg(l.pid) from pg_locks l
                 where l.locktype = 'advisory' and l.granted and l.objsubid = 2
                   and l.classid = pgleader.lock_namespace()::oid and l.objid = e.lock_id::oid
                   and l.database = (select oid from pg_database where datname = current_database())
               ) as holders
          from pgleader.leader v join pgleader.election e on e.name = v.election
         where v.election = %s
        """,
        [election],
    )
    row = await cur.fetchone()
    assert row is not None
    return dict(zip(["epoch", "leader", "backend_pid", "lock_held", "holders"], row, strict=True))


async def history(
    db: psycopg.AsyncConnection[Any], election: str = "main"
) -> list[tuple[Any, ...]]:
    cur = await db.execute(
        "select epoch, instance_id, acquired_at, released_at, release_reason"
        " from pgleader.leadership_history where election = %s order by epoch",
        [election],
    )
    return await cur.fetchall()


def assert_view_agrees(seen: dict[str, Any], leaders: list[Elector]) -> None:
    holders = seen["holders"] or []
    assert len(holders) <= 1, f"advisory lock granted to several backends: {holders}"
    if seen["leader"] is not None:
        # the view names a leader only when that backend really holds the lock
        assert seen["lock_held"] and holders == [seen["backend_pid"]]
        assert [e.instance_id for e in leaders] in ([], [seen["leader"]])


async def test_exactly_one_leader_among_concurrent_electors_over_many_rounds(electors, db):
    group: list[Elector] = await electors(5)
    epochs = []
    for _ in range(12):
        leader = await first_leader(group)
        leaders = [e for e in group if e.is_leader]
        assert leaders == [leader]
        seen = await observe(db)
        assert_view_agrees(seen, leaders)
        assert seen["leader"] == leader.instance_id and seen["epoch"] == leader.epoch
        epochs.append(leader.epoch)
        await leader.resign("next round")
        assert not leader.is_leader
        assert_view_agrees(await observe(db), [e for e in group if e.is_leader])
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)
    assert epochs == list(range(epochs[0], epochs[0] + len(epochs)))


async def test_killed_lock_session_hands_over_and_old_epoch_is_fenced(electors, db):
    group = await electors(3)
    old = await first_leader(group)
    old_epoch = old.epoch
    assert old_epoch is not None
    demoted_at: list[float] = []
    old.on_transition(lambda t: t.kind == "demoted" and demoted_at.append(time.monotonic()))

    seen = await observe(db)
    await db.execute("select pg_terminate_backend(%s)", [seen["backend_pid"]])
    new = await first_leader([e for e in group if e is not old])
    elected_at = time.monotonic()

    assert demoted_at and demoted_at[0] <= elected_at, "old leader still claimed leadership"
    assert not old.is_leader and new.epoch == old_epoch + 1
    async with db.transaction():
        with pytest.raises(Fenced):
            await check_epoch(db, "main", old_epoch)
        with pytest.raises(NotLeader):
            await old.fence(db)
        assert await new.fence(db) == old_epoch + 1
    rows = await history(db)
    assert rows[0][0] == old_epoch and rows[0][4] == "session_ended"


async def test_graceful_resign_hands_over_at_once_and_closes_history(electors, db):
    group = await electors(3)
    old = await first_leader(group)
    started = time.monotonic()
    await old.resign("maintenance")
    new = await first_leader([e for e in group if e is not old], timeout=5)
    took = time.monotonic() - started
    assert took < 1.0, f"hand-over took {took:.3f} s"  # generous: measured in bench/
    rows = await history(db)
    assert [(r[0], r[1], r[4]) for r in rows] == [
        (1, old.instance_id, "maintenance"),
        (2, new.instance_id, None),
    ]
    assert rows[0][3] is not None and rows[0][3] <= rows[1][2]


async def test_flapping_leadership_leaves_one_history_row_per_epoch_without_overlap(electors, db):
    group = await electors(3)
    for _ in range(10):
        leader = await first_leader(group)
        await leader.resign("flap")
    await first_leader(group)
    rows = await history(db)
    assert [r[0] for r in rows] == list(range(1, 12))
    for before, after in itertools.pairwise(rows):
        assert before[3] is not None and before[3] <= after[2], (
            f"epochs {before[0]}/{after[0]} overlap"
        )
        assert before[4] == "flap"
    assert rows[-1][3] is None


async def test_fenced_transactions_never_commit_with_an_old_epoch_after_the_bump(electors, db, dsn):
    cur = await db.execute("show track_commit_timestamp")
    if (await cur.fetchone()) != ("on",):
        pytest.skip("needs track_commit_timestamp=on (the suite's own server has it)")
    await db.execute("create table fenced_work (epoch bigint not null)")
    group = await electors(2)
    old = await first_leader(group)
    old_epoch = old.epoch
    stop = asyncio.Event()
    outcomes = {"committed": 0, "fenced": 0}

    async def worker() -> None:
        while not stop.is_set():
            # a claim still blocking the bump after a lease is terminated by the new leader
            with contextlib.suppress(psycopg.OperationalError):
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    while not stop.is_set():
                        try:
                            async with conn.transaction():
                                await check_epoch(conn, "main", old_epoch)
                                await conn.execute(
                                    "insert into fenced_work values (%s)", [old_epoch]
                                )
                            outcomes["committed"] += 1
                        except Fenced:
                            outcomes["fenced"] += 1

    workers = [asyncio.create_task(worker()) for _ in range(20)]
    await asyncio.sleep(0.2)  # let the workers commit under the old epoch for a while
    seen = await observe(db)
    await db.execute("select pg_terminate_backend(%s)", [seen["backend_pid"]])
    await first_leader([e for e in group if e is not old])
    await asyncio.sleep(0.2)  # and keep racing after the bump
    stop.set()
    await asyncio.gather(*workers)

    assert outcomes["committed"] > 0 and outcomes["fenced"] > 0, outcomes
    cur = await db.execute(
        """
        select count(*) from fenced_work w
         where pg_xact_commit_timestamp(w.xmin) >= (
               select pg_xact_commit_timestamp(h.xmin) from pgleader.leadership_history h
                where h.election = 'main' and h.epoch = %s)
        """,
        [old_epoch + 1],
    )
    assert await cur.fetchone() == (0,), "work committed under the old epoch after the bump"


async def test_independent_elections_coexist(electors, db):
    a = await electors(2, election="alpha")
    b = await electors(2, election="beta")
    la, lb = await first_leader(a), await first_leader(b)
    assert la.is_leader and lb.is_leader
    assert (await observe(db, "alpha"))["leader"] == la.instance_id
    assert (await observe(db, "beta"))["leader"] == lb.instance_id


async def test_follower_stop_is_prompt_while_waiting_on_the_lock(electors):
    group = await electors(2)
    leader = await first_leader(group)
    follower = next(e for e in group if e is not leader)
    started = time.monotonic()
    await follower.stop()
    assert time.monotonic() - started < 1.0
    assert leader.is_leader


async def poll(condition: Callable[[], Any], timeout: float = 10) -> None:
    """For state that has no event to await (a heartbeat count): bounded polling."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_heartbeats_refresh_the_election_row_and_the_registry(electors, db):
    group = await electors(2)
    leader = await first_leader(group)
    query = "select heartbeat_at from pgleader.election where name = 'main'"
    (before,) = await (await db.execute(query)).fetchone()
    beats = leader.stats["heartbeats_ok"]
    await poll(lambda: leader.stats["heartbeats_ok"] >= beats + 2)
    (after,) = await (await db.execute(query)).fetchone()
    assert after > before
    cur = await db.execute(
        "select instance_id, is_leader, now() - last_heartbeat < interval '5 s'"
        " from pgleader.instances where election = 'main' order by instance_id"
    )
    assert sorted(await cur.fetchall()) == sorted((e.instance_id, e is leader, True) for e in group)


async def test_fence_outside_a_transaction_is_refused(electors, db):
    leader = await first_leader(await electors(1))
    with pytest.raises(RuntimeError, match="inside a transaction"):
        await leader.fence(db)


async def test_a_hung_fenced_transaction_cannot_stall_the_failover(electors, db, dsn):
    group = await electors(2)
    old = await first_leader(group)
    # a paused process of the old leader, stopped in the middle of a fenced claim
    hung = await psycopg.AsyncConnection.connect(dsn)
    await check_epoch(hung, "main", old.epoch)  # opens a transaction, row held FOR SHARE
    hung_pid = hung.info.backend_pid
    seen = await observe(db)
    await db.execute("select pg_terminate_backend(%s)", [seen["backend_pid"]])
    new = await first_leader([e for e in group if e is not old])
    assert new.epoch == 2
    cur = await db.execute("select count(*) from pg_stat_activity where pid = %s", [hung_pid])
    assert await cur.fetchone() == (0,), "the hung claim still holds the election row"
    with pytest.raises(psycopg.OperationalError):
        await hung.execute("commit")
    await hung.close()


async def test_a_partitioned_leader_steps_down_on_its_lease_before_anyone_is_elected(dsn, db):
    from tests.chaos.proxy import BlackholeProxy

    port = psycopg.conninfo.conninfo_to_dict(dsn)["port"]
    proxy = BlackholeProxy(int(port))
    await proxy.start()
    cut_off = Elector(
        psycopg.conninfo.make_conninfo(dsn, port=proxy.port), "main", instance_id="cut-off",
        timings=FAST,
    )  # fmt: skip
    other = Elector(dsn, "main", instance_id="other", timings=FAST)
    order: list[str] = []
    cut_off.on_transition(lambda t: t.kind == "demoted" and order.append("cut-off demoted"))
    other.on_transition(lambda t: t.kind == "elected" and order.append("other elected"))
    try:
        await cut_off.start()
        await cut_off.wait_for_leadership(10)
        await other.start()
        proxy.blackhole()  # silence: no FIN, no RST
        await other.wait_for_leadership(15)
        assert order == ["cut-off demoted", "other elected"]
        assert not cut_off.is_leader
        cur = await db.execute(
            "select release_reason from pgleader.leadership_history where epoch = 1"
        )
        assert await cur.fetchone() == ("evicted",)
    finally:
        proxy.heal()
        await asyncio.gather(cut_off.stop(), other.stop())
        await proxy.stop()


async def test_a_rehearsed_claim_changes_nothing_and_waits_for_nothing(electors, db, dsn):
    """Every follower rehearses claim_leadership once per session (a takeover then finds
    it compiled and planned): on no row, so it locks, writes, releases and broadcasts
    nothing, even while the leader's fenced transaction holds the election row."""
    group = await electors(2)
    leader = await first_leader(group)
    follower = next(e for e in group if e is not leader)
    before = (await observe(db), await history(db))
    fenced = await psycopg.AsyncConnection.connect(dsn)
    listener = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        await check_epoch(fenced, "main", leader.epoch)  # the row held FOR SHARE
        await listener.execute("listen pgleader_events")
        async with await psycopg.AsyncConnection.connect(dsn) as rehearsal:
            await rehearsal.execute("set lock_timeout = '200ms'")  # a wait would fail it
            cur = await rehearsal.execute(
                "select * from pgleader.claim_leadership(%s, %s, 'h', true,"
                " make_interval(secs => 1), true)",
                ["main", follower.instance_id],
            )
            assert await cur.fetchone() == (None, None, None, None)
            cur = await rehearsal.execute(
                "select pg_current_xact_id_if_assigned(), current_setting('lock_timeout'),"
                " (select count(*) from pg_locks where pid = pg_backend_pid()"
                "  and locktype in ('tuple', 'transactionid', 'advisory'))"
            )
            assert await cur.fetchone() == (None, "200ms", 0)  # no write, no row, no lock
            await rehearsal.commit()  # a NOTIFY it had queued would go out now
            await rehearsal.execute("select pg_notify('pgleader_events', 'end')")
            await rehearsal.commit()
            pid = rehearsal.info.backend_pid
        await fenced.rollback()
        heard = []
        async with asyncio.timeout(10):
            async for n in listener.notifies():
                if n.pid == pid and n.payload == "end":
                    break
                heard.append((n.pid, n.payload))
        assert [payload for sender, payload in heard if sender == pid] == []
    finally:
        await fenced.close()
        await listener.close()
    assert (await observe(db), await history(db)) == before
    assert leader.is_leader and leader.epoch == before[0]["epoch"]
