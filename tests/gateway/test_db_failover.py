"""A PostgreSQL failover under load: the primary crashes (immediate), its synchronous
standby is promoted, and three `pgleader serve` instances that reach the database
through a multi-host DSN (target_session_attrs=read-write) find the new primary by
themselves. Every signal answered 2xx is executed exactly once, the epochs keep
growing across the failover, a new leader is elected on the promoted node, nothing
stays spooled. The figures (promotion -> new leader, -> first executed signal, the
slowest answer) are printed, not bounded here."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from pgleader.migrations import migrate
from tests.support.gateway import Cluster, cluster, signal_body
from tests.support.replication import ReplicatedPostgres, replicated_postgres

pytestmark = pytest.mark.slow

# Signals per second, round robin over the instances (PGLEADER_TEST_FAILOVER_RATE, to
# measure a heavier load: the default keeps `make test` light on a 2-core machine).
RATE = float(os.environ.get("PGLEADER_TEST_FAILOVER_RATE", "40"))
# Several instruments: a claim in flight when the primary dies holds its instrument
# (one order in flight each) until the broker is asked, after --broker-settle.
INSTRUMENTS = ["BANK_NIFTY", "NIFTY", "FIN_NIFTY", "MIDCAP_NIFTY"]
# s of load before the crash, crash -> promote (PGLEADER_TEST_FAILOVER_GAP, to measure a
# longer outage: the default keeps `make test` short), after the promotion
BEFORE, AFTER = 3.0, 5.0
GAP = float(os.environ.get("PGLEADER_TEST_FAILOVER_GAP", "1.0"))


@pytest.fixture
def pair() -> Iterator[ReplicatedPostgres]:
    with replicated_postgres(synchronous=True) as started:
        yield started


@pytest.fixture
async def gw(pair: ReplicatedPostgres, tmp_path: Path) -> AsyncIterator[Cluster]:
    await migrate(pair.dsn)
    async with cluster(pair.dsn, tmp_path) as c:
        yield c


class Load:
    """Webhooks at a steady rate, round robin, each answer timed; runs until stopped.
    Each on a connection of its own when needed, as TradingView's are: a client pool of
    a hundred (aiohttp's default) would queue requests here, not in the gateway, while
    answers take 1.5 s through the outage."""

    def __init__(self, gw: Cluster) -> None:
        self.gw = gw
        self.answers: list[tuple[str, int | None, float, float, str]] = []
        self.running = True
        self._numbers = itertools.count(1)
        self._http: aiohttp.ClientSession | None = None

    async def one(self, node: Any) -> None:
        number = next(self._numbers)
        position = f"Long_fo_{number}"
        instrument = INSTRUMENTS[number % len(INSTRUMENTS)]
        sent = time.time()
        started = time.monotonic()
        assert self._http is not None
        body = signal_body(position=position, instrument=instrument, lots=1)
        try:
            async with self._http.post(f"{node.url}/webhook", json=body) as resp:
                status, answer = resp.status, await resp.json(content_type=None)
            outcome = str(answer.get("status"))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            status, outcome = None, type(exc).__name__
        self.answers.append((position, status, sent, time.monotonic() - started, outcome))

    async def run(self) -> None:
        nodes = list(self.gw.nodes.values())
        tasks = []
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=15)
        ) as self._http:
            for i in itertools.count():
                if not self.running:
                    break
                tasks.append(asyncio.create_task(self.one(nodes[i % len(nodes)])))
                await asyncio.sleep(1 / RATE)
            await asyncio.gather(*tasks)


async def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(sql, params or None)
        return await cur.fetchall()


async def leader_now(dsn: str) -> tuple[str, int] | None:
    """(leader, epoch) while its lock is held, by the view; None meanwhile or unreachable."""
    with contextlib.suppress(psycopg.OperationalError):
        rows = await query(
            dsn, "select leader, epoch from pgleader.leader where election = 'gateway'"
            " and lock_held",
        )  # fmt: skip
        return (rows[0][0], rows[0][1]) if rows else None
    return None


async def elected(dsn: str, *, above: int, timeout: float) -> tuple[str, int]:
    """The leader and its epoch, once one above `above` holds the lock."""
    async with asyncio.timeout(timeout):
        while True:
            found = await leader_now(dsn)
            if found is not None and found[1] > above:
                return found
            await asyncio.sleep(0.02)


async def test_a_failover_to_a_synchronous_standby_loses_and_duplicates_nothing(pair, gw):
    await gw.start(3)
    first = await elected(pair.dsn, above=0, timeout=20)
    load = Load(gw)
    sender = asyncio.create_task(load.run())
    await asyncio.sleep(BEFORE)

    crashed = time.time()
    await asyncio.to_thread(pair.stop_primary)
    await asyncio.sleep(GAP)
    promoting = time.time()
    await asyncio.to_thread(pair.promote)
    promoted = time.time()
    second = await elected(pair.dsn, above=first[1], timeout=30)
    await asyncio.sleep(AFTER)
    load.running = False
    await sender

    # the multi-host DSN now reaches the promoted standby alone
    (server,) = await query(pair.dsn, "select inet_server_port(), pg_is_in_recovery()")
    assert server == (pair.standby.port, False)

    answered = {position: status for position, status, *_ in load.answers}
    refused = [a for a in load.answers if a[1] is None or not 200 <= a[1] < 300]
    if refused:  # when, relative to the crash, and what became of them
        outcomes = Counter((a[1], a[4]) for a in refused)
        sent = sorted(round(a[2] - crashed, 1) for a in refused)
        raise AssertionError(
            f"{len(refused)} of {len(load.answers)} not answered 2xx:"
            f" {dict(outcomes)}; sent {sent[0]}..{sent[-1]} s after the crash"
        )

    # every signal answered 2xx is stored (the spooled ones replayed) and settles executed
    positions = list(answered)
    async with asyncio.timeout(90):
        while True:
            rows = await query(
                pair.dsn, "select position, id, status from gateway.signals"
                " where position = any(%s)", positions,
            )  # fmt: skip
            ids = {r[0]: r[1] for r in rows}
            status = {r[0]: r[2] for r in rows}
            if len(rows) == len(positions) and not {"pending", "executing"} & set(status.values()):
                break
            await asyncio.sleep(0.1)
    assert set(status.values()) == {"executed"}, {
        s: list(status.values()).count(s) for s in set(status.values())
    }
    per_signal = await gw.broker_requests_per_signal()
    assert {ids[p]: per_signal.get(ids[p], 0) for p in positions} == {ids[p]: 1 for p in positions}

    # epochs strictly increase across the failover, the new term on the promoted node
    history = await query(
        pair.dsn, "select epoch, instance_id, extract(epoch from acquired_at)::float8"
        " from pgleader.leadership_history where election = 'gateway' order by acquired_at, epoch",
    )  # fmt: skip
    epochs = [row[0] for row in history]
    assert epochs == sorted(set(epochs)), history
    after = [row for row in history if row[2] >= crashed]
    assert after and all(row[0] > first[1] for row in after), history
    elected_at = min(row[2] for row in after)

    # nothing stays spooled
    spooled = [f for f in (gw.data_dir / "spool").glob("*.jsonl") if f.read_text().strip()]
    assert spooled == []

    (first_executed,) = await query(
        pair.dsn, "select extract(epoch from min(finished_at))::float8,"
        " count(*) filter (where finished_at > to_timestamp(%s) + interval '5 s')"
        " from gateway.signals where status = 'executed' and finished_at >= to_timestamp(%s)",
        promoting, promoting,
    )  # fmt: skip
    # A claim in flight at the crash holds its instrument until settled (--broker-settle):
    # the old term's orders whose signal ended after the promotion, and when it ended.
    in_flight_at_crash = await query(
        pair.dsn, "select s.instrument, o.outcome, s.status,"
        " round((extract(epoch from s.finished_at) - %s)::numeric, 3)::float8"
        " from gateway.signals s join gateway.orders o on o.signal_id = s.id"
        " where o.epoch < %s and s.finished_at >= to_timestamp(%s) order by s.instrument",
        promoting, second[1], promoting,
    )  # fmt: skip
    by_instrument = await query(
        pair.dsn, "select instrument,"
        " round((extract(epoch from min(finished_at)) - %s)::numeric, 3)::float8"
        " from gateway.signals where status = 'executed' and finished_at >= to_timestamp(%s)"
        " group by instrument order by instrument",
        promoting, promoting,
    )  # fmt: skip
    times = sorted(a[3] for a in load.answers)
    in_flight = [a for a in load.answers if crashed <= a[2] <= promoted]
    figures = {
        "signals": len(load.answers),
        "spooled_answers": sum(1 for a in load.answers if a[4] == "spooled"),
        "sent_while_down": len(in_flight),
        "promote_s": round(promoted - promoting, 3),
        "promote_to_elected_s": round(elected_at - promoting, 3),
        "promote_to_first_executed_s": round(first_executed[0] - promoting, 3)
        if first_executed[0] is not None
        else None,
        "executed_over_5s_after_promote": first_executed[1],
        "answer_max_s": round(times[-1], 3),
        "answer_p99_s": round(times[int(len(times) * 0.99) - 1], 3),
        "answers_over_3s": sum(1 for t in times if t > 3.0),
        "in_flight_at_crash": [list(row) for row in in_flight_at_crash],
        "first_executed_by_instrument_s": dict(by_instrument),
        "gap_s": GAP,
        "rate_per_s": RATE,
        "epochs": [first[1], second[1]],
    }
    print("db_failover", json.dumps(figures))
