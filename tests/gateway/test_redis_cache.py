"""Redis, optional and never authoritative, with real `pgleader serve` processes and a
real redis-server of the test's own (tests/support/redis.py).

What Redis adds: the leader's entry (`pgleader:gateway:leader`, a lease's TTL), and
duplicates answered as such while PostgreSQL is down. What it never does: lose a
signal, execute one twice, slow an answer, or refuse a signal PostgreSQL would take,
whether it is killed, paused, absent, or holds wrong data. Its password never shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from pgleader.embedded import EmbeddedPostgres, free_port
from service.intake.signals import fingerprint_raw
from tests.support.gateway import (
    Cluster,
    GatewayProcess,
    cluster,
    eventually,
    signal_body,
    until,
)
from tests.support.redis import RedisServer, redis_server

PASSWORD = "redis-pw-7f3a91"
LEADER_KEY = "pgleader:gateway:leader"
LEASE_MS = 600  # tests.support.gateway.FAST: --lease 0.6
# s: TradingView waits 3 s. With the database away too, an answer is the inbox's store
# budget (1.5 s) and a Redis lookup cut at its timeout (0.25 s) before the spool's
# fsync: a sick Redis must add no more than that.
FAST_ANSWER = 2.5


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server(password=PASSWORD) as server:
        yield server


@pytest.fixture
async def kv(redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """The test's own client of that Redis, for setting and reading entries."""
    client = aioredis.Redis.from_url(redis.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def uses(url: str) -> dict[str, str]:
    return {"PGLEADER_REDIS_URL": url}


def fp_key(body: dict[str, Any]) -> str:
    return f"pgleader:gateway:fp:{fingerprint_raw(body)}"


async def timed_post(
    gw: Cluster, node: GatewayProcess, body: dict[str, Any]
) -> tuple[int, str, dict[str, Any]]:
    started = time.monotonic()
    status, answer = await gw.post(node, body)
    elapsed = time.monotonic() - started
    assert elapsed < FAST_ANSWER, f"answered after {elapsed:.2f} s: {answer}"
    return status, answer["status"], answer


async def leader_entry(kv: aioredis.Redis, leader: str, timeout: float = 15) -> dict[str, Any]:
    """The leader's entry once it names `leader`."""
    found: dict[str, Any] = {}

    async def names_it() -> bool:
        raw = await kv.get(LEADER_KEY)
        with_json = json.loads(raw) if raw and raw.startswith("{") else {}
        found.update(with_json)
        return with_json.get("leader") == leader

    await until(names_it, timeout)
    return found


async def epoch(gw: Cluster) -> int:
    return int(await gw.scalar("select epoch from pgleader.election where name = 'gateway'"))


def spooled_fingerprints(data_dir: Path) -> list[str]:
    lines = [
        line
        for path in (data_dir / "spool").glob("*.jsonl")
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    return [json.loads(line)["fingerprint"] for line in lines]


async def metrics(gw: Cluster, node: GatewayProcess) -> str:
    async with gw.http.get(f"{node.operator_url}/metrics") as resp:
        return await resp.text()


def assert_password_never_shown(gw: Cluster, *texts: str) -> None:
    for node in gw.nodes.values():
        assert PASSWORD not in node.log_path.read_text(), f"{node.instance_id}'s log"
    for text in texts:
        assert PASSWORD not in text


async def executed_once(gw: Cluster, expected: int) -> dict[int, int]:
    """Every signal stored once, ended executed, each sent to the broker once."""
    await until(lambda: gw.scalar(f"select count(*) = {expected} from gateway.signals"))
    ids = [r[0] for r in await gw.query("select id from gateway.signals")]
    assert set((await gw.settled(ids)).values()) == {"executed"}
    requests = await gw.broker_requests_per_signal()
    assert requests == {sid: 1 for sid in ids}
    return requests


# -- the leader's entry ----------------------------------------------------------------


async def test_the_leader_publishes_itself_for_a_lease_and_the_entry_moves_on_failover(
    dsn: str, tmp_path: Path, redis: RedisServer, kv: aioredis.Redis
) -> None:
    await kv.set(LEADER_KEY, "bogus, left by nobody")  # wrong data, no TTL: overwritten
    async with cluster(dsn, tmp_path) as gw, key_events(kv, LEADER_KEY) as events:
        gw1, gw2 = await gw.start(2, env=uses(redis.url))
        first = await gw.leader()
        second = gw2 if first is gw1 else gw1
        entry = await leader_entry(kv, first.instance_id)
        assert entry == {"leader": first.instance_id, "epoch": await epoch(gw), "url": first.url}
        ttl = await kv.pttl(LEADER_KEY)
        assert 0 < ttl <= LEASE_MS

        last = [ttl]

        async def refreshed() -> bool:  # every heartbeat, while it leads
            # A TTL only falls between two reads unless the entry was set again between
            # them (comparing with the first read needs a read closer to a refresh).
            now = await kv.pttl(LEADER_KEY)
            risen, last[0] = now > last[0], now
            return risen

        await until(refreshed, timeout=5)

        # A paused leader loses its lease; the follower takes over and publishes itself.
        first.signal(signal.SIGSTOP)
        try:
            entry = await leader_entry(kv, second.instance_id)
            assert entry == {"leader": second.instance_id, "epoch": await epoch(gw),
                             "url": second.url}  # fmt: skip
        finally:
            first.signal(signal.SIGCONT)
        # The old one, woken, removes the entry only if it still holds its own epoch:
        # the successor's stays (no `del` ever reached the key).
        await until(lambda: counted(gw, first, "release_leader", "ok"), timeout=15)
        assert "del" not in events, events
        assert (await leader_entry(kv, second.instance_id))["epoch"] == entry["epoch"]

        published = await metrics(gw, second)
        assert 'operation="publish_leader",outcome="ok"' in published
        _, view = await gw.get(second, "/coordinator/leader")
        # The last one resigning on shutdown removes its entry: nobody leads, none is named.
        await first.stop()
        await second.stop()
        await eventually(lambda: "del" in events, timeout=10)
        assert not await kv.exists(LEADER_KEY)
        assert_password_never_shown(gw, published, json.dumps(view))


@contextlib.asynccontextmanager
async def key_events(kv: aioredis.Redis, key: str) -> AsyncIterator[list[str]]:
    """What happens to `key` (set, expire, del, expired), as Redis tells subscribers."""
    await kv.config_set("notify-keyspace-events", "Kg$x")
    pubsub = kv.pubsub()
    await pubsub.subscribe(f"__keyspace@0__:{key}")
    events: list[str] = []

    async def read() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                events.append(message["data"])

    reader = asyncio.create_task(read())
    try:
        yield events
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await pubsub.aclose()


async def counted(gw: Cluster, node: GatewayProcess, operation: str, outcome: str) -> bool:
    """/metrics of `node` shows Redis operations of that outcome."""
    sample = f'gateway_redis_operations_total{{operation="{operation}",outcome="{outcome}"}}'
    return sample in await metrics(gw, node)


# -- fingerprints: a duplicate during a database outage ------------------------------


async def test_a_duplicate_sent_while_postgres_is_down_is_answered_duplicate_yet_spooled_and_executed_once(
    own_server: EmbeddedPostgres, tmp_path: Path, redis: RedisServer, kv: aioredis.Redis
) -> None:
    async with cluster(own_server.dsn, tmp_path) as gw:
        (node,) = await gw.start(1, env=uses(redis.url))
        await gw.leader()
        first = signal_body()
        status, outcome, answer = await timed_post(gw, node, first)
        assert (status, outcome) == (200, "executed"), answer
        sid = answer["signal_id"]

        async def cached() -> bool:  # written once the inbox holds it
            return await kv.get(fp_key(first)) == str(sid)

        await until(cached, timeout=10)
        assert 0 < await kv.pttl(fp_key(first)) <= 24 * 3600 * 1000

        own_server.stop("fast")
        # TradingView re-sends (say after a 5xx on its side): Redis knows it
        status, outcome, answer = await timed_post(gw, node, first)
        assert (status, answer) == (200, {"status": "duplicate", "signal_id": sid})
        fresh = signal_body()
        status, outcome, answer = await timed_post(gw, node, fresh)
        assert (status, outcome) == (202, "spooled"), answer
        # ... and both are kept: Redis changed an answer, not what is stored
        assert spooled_fingerprints(tmp_path) == [fingerprint_raw(first), fingerprint_raw(fresh)]

        own_server.start()
        requests = await executed_once(gw, 2)
        assert sid in requests
        await until(lambda: _empty(tmp_path))
        (fresh_id,) = set(requests) - {sid}

        async def replay_cached() -> bool:  # the replayed signal's id, once the inbox has it
            return await kv.get(fp_key(fresh)) == str(fresh_id)

        await until(replay_cached, timeout=10)
        status, outcome, answer = await timed_post(gw, node, fresh)
        assert (status, answer) == (200, {"status": "duplicate", "signal_id": fresh_id})
        assert await gw.broker_requests_per_signal() == requests


async def _empty(data_dir: Path) -> bool:
    return not spooled_fingerprints(data_dir)


# -- Redis sick: killed, paused, absent ----------------------------------------------


@pytest.mark.parametrize("fault", ["killed", "paused", "absent"])
async def test_a_killed_paused_or_absent_redis_never_costs_a_signal_nor_a_fast_answer(
    fault: str, own_server: EmbeddedPostgres, tmp_path: Path, redis: RedisServer,
    kv: aioredis.Redis,
) -> None:  # fmt: skip
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0" if fault == "absent" else redis.url
    async with cluster(own_server.dsn, tmp_path) as gw:
        (node,) = await gw.start(1, env=uses(url))
        await gw.leader()
        before = signal_body()
        status, outcome, answer = await timed_post(gw, node, before)
        assert (status, outcome) == (200, "executed"), answer
        if fault != "absent":
            await until(lambda: _has(kv, fp_key(before)), timeout=10)
        if fault == "killed":
            redis.kill()
        elif fault == "paused":
            redis.pause()
        try:
            # with PostgreSQL up, Redis is never asked: stored and executed
            status, outcome, answer = await timed_post(gw, node, signal_body())
            assert (status, outcome) == (200, "executed"), answer
            # with PostgreSQL down, its answer is not to be had: spooled, as without it
            own_server.stop("fast")
            for body in (before, signal_body(), signal_body()):
                status, outcome, answer = await timed_post(gw, node, body)
                assert (status, outcome) == (202, "spooled"), answer
            own_server.start()
            await executed_once(gw, 4)  # the re-sent one stays a single signal
        finally:
            if fault == "paused":
                redis.resume()
        text = await metrics(gw, node)
        failed = {"killed": "error", "paused": "timeout", "absent": "error"}[fault]
        assert f'operation="lookup_fingerprint",outcome="{failed}"' in text or (
            'operation="lookup_fingerprint",outcome="skipped"' in text
        ), text
        assert_password_never_shown(gw, text)


async def _has(kv: aioredis.Redis, key: str) -> bool:
    return bool(await kv.exists(key))


# -- Redis wrong -------------------------------------------------------------------


async def test_a_fingerprint_redis_holds_for_a_signal_postgres_never_saw_changes_nothing_while_it_is_up(
    dsn: str, tmp_path: Path, redis: RedisServer, kv: aioredis.Redis
) -> None:
    body = signal_body()
    await kv.set(fp_key(body), "424242")  # stale or wrong: PostgreSQL alone decides
    async with cluster(dsn, tmp_path) as gw:
        (node,) = await gw.start(1, env=uses(redis.url))
        await gw.leader()
        status, outcome, answer = await timed_post(gw, node, body)
        assert (status, outcome) == (200, "executed"), answer
        sid = answer["signal_id"]
        assert sid != 424242
        assert await gw.broker_requests_per_signal() == {sid: 1}

        async def corrected() -> bool:
            return await kv.get(fp_key(body)) == str(sid)

        await until(corrected, timeout=10)


# -- settings ----------------------------------------------------------------------


def _serve_refusal(
    env: dict[str, str], *, without_redis: bool = False
) -> subprocess.CompletedProcess[str]:
    prelude = "import sys; sys.modules['redis'] = None; " if without_redis else ""
    code = prelude + "import runpy; runpy.run_module('pgleader', run_name='__main__')"
    argv = [sys.executable, "-c", code, "serve", "--dsn", "host=127.0.0.1 port=1 dbname=x",
            "--port", str(free_port())]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if not k.startswith("PGLEADER_")}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=30,
        env={**base, "PGLEADER_WEBHOOK_SECRET": "s", **env},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("url", "without_redis", "expected"),
    [
        (f"redis://:{PASSWORD}@127.0.0.1:6379/0", True, "pip install 'pgleader[redis]'"),
        (f"http://:{PASSWORD}@127.0.0.1:6379/0", False, "not a redis://"),
        (f"redis://:{PASSWORD}@127.0.0.1:port/0", False, "not a redis://"),
    ],
)
def test_an_unusable_redis_setting_is_one_line_at_start_without_the_password(
    url: str, without_redis: bool, expected: str
) -> None:
    done = _serve_refusal({"PGLEADER_REDIS_URL": url}, without_redis=without_redis)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "PGLEADER_REDIS_URL" in lines[0] and expected in lines[0], lines
    assert PASSWORD not in done.stderr + done.stdout
