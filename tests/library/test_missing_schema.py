"""A database nobody migrated is one clear error that says to run `pgleader migrate`,
never a warning every 50 ms and a wait that never ends."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
import structlog

from pgleader import Elector, MigrationError, SchemaMissing, Timings, migrate
from pgleader.embedded import free_port
from tests.library.test_cli import assert_one_line_error, run

FAST = Timings(heartbeat=0.2, lease=0.5, evict_after=1.0)


async def test_an_elector_on_an_unmigrated_database_refuses_to_start(empty_database_dsn):
    elector = Elector(empty_database_dsn, "main", timings=FAST)
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(SchemaMissing, match=r"run `pgleader migrate`") as raised:
            await elector.start()
    assert isinstance(raised.value, MigrationError)
    assert 'schema "pgleader" does not exist' in str(raised.value)
    assert "\n" not in str(raised.value)
    assert logs == []
    await elector.stop()  # nothing to stop: harmless


async def test_a_schema_dropped_under_running_electors_ends_their_waits_until_migrated(dsn):
    leader = Elector(dsn, "main", instance_id="a", timings=FAST)
    follower = Elector(dsn, "main", instance_id="b", timings=FAST)
    await leader.start()
    try:
        await leader.wait_for_leadership(10)
        await follower.start()
        with structlog.testing.capture_logs() as logs:
            await _drop_schema(dsn)
            started = time.monotonic()
            with pytest.raises(SchemaMissing, match=r"run `pgleader migrate`"):
                await follower.wait_for_leadership(10)
            while leader.is_leader:  # its next beat finds the schema gone
                assert time.monotonic() - started < 5
                await asyncio.sleep(0.05)
            with pytest.raises(SchemaMissing, match=r"run `pgleader migrate`"):
                await leader.wait_for_leadership(10)
            assert time.monotonic() - started < 5
            await asyncio.sleep(0.5)  # long enough for several retries, were there any
        missing = [e for e in logs if e["event"] == "election paused: schema missing"]
        assert len(missing) == 2, logs  # once per elector, not once per retry
        # A statement in flight as the schema is dropped may fail on the dropped relation's
        # OID (the server's race with the DDL, an internal error), be the victim of a
        # deadlock with the DROP (a beat's two tables, locked in the other order), or be
        # a leader's heartbeat that waited behind the DROP past its 0.3 s of lease: that
        # one rejoin is retried at once and finds the schema missing; nothing else may be
        # retried.
        lost = [e for e in logs if e["event"] == "election connection lost, rejoining"]
        assert all(e["error"].startswith(_DDL_RACES) for e in lost), lost
        assert len(lost) == len({e["instance"] for e in lost}), lost  # once per elector
        # A migration brings the schema back: the electors find it on their own.
        elected = asyncio.Event()
        for elector in (leader, follower):
            elector.on_transition(lambda t: elected.set() if t.kind == "elected" else None)
        await migrate(dsn)
        await asyncio.wait_for(elected.wait(), 20)
        assert leader.is_leader or follower.is_leader
    finally:
        await follower.stop()
        await leader.stop()


_DDL_RACES = ("could not open relation", "deadlock detected", "lease expired")


async def _drop_schema(dsn: str) -> None:
    """Drop the schema as an operator would: a DROP that the server picks as a deadlock's
    victim (it locks the tables in its own order, a heartbeat in another) is run again."""
    for _ in range(5):
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            try:
                await conn.execute("drop schema pgleader cascade")
                return
            except psycopg.errors.DeadlockDetected:
                continue
    raise AssertionError("drop schema pgleader: a deadlock victim five times")


def test_serve_no_migrate_on_an_unmigrated_database_exits_in_one_line(empty_database_dsn):
    started = time.monotonic()
    result = run(
        "serve", "--dsn", empty_database_dsn, "--no-migrate", "--log-format", "json",
        "--port", str(free_port()), "--operator-port", str(free_port()),
        env={"PGLEADER_WEBHOOK_SECRET": "x"}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, "run `pgleader migrate`")
    assert time.monotonic() - started < 20
    warnings = [line for line in result.stderr.splitlines() if '"warning"' in line]
    assert warnings == [], warnings


def test_serve_no_migrate_on_a_database_with_only_the_library_schema_exits_in_one_line(
    empty_database_dsn,
):
    """`migrate --only pgleader`, then the gateway: its own schema is missing."""
    assert run("migrate", "--dsn", empty_database_dsn, "--only", "pgleader").returncode == 0
    result = run(
        "serve", "--dsn", empty_database_dsn, "--no-migrate", "--log-format", "json",
        "--port", str(free_port()), "--operator-port", str(free_port()),
        env={"PGLEADER_WEBHOOK_SECRET": "x"}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, "gateway/", "run `pgleader migrate`")
    assert "sweep crashed" not in result.stderr
