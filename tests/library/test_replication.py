"""The suite's replicated PostgreSQL (tests/support/replication.py) does what the
failover tests rely on: a synchronous standby streams the primary's commits, and
after the primary's crash and the standby's promotion the multi-host DSN finds the
promoted node, writable, with every commit the primary acknowledged."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.support.replication import ReplicatedPostgres, replicated_postgres


@pytest.fixture
def pair() -> Iterator[ReplicatedPostgres]:
    with replicated_postgres(synchronous=True) as started:
        yield started


def one(dsn: str, statement: str) -> tuple:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(statement).fetchone()
    assert row is not None
    return tuple(row)


def test_a_synchronous_standby_has_every_commit_and_takes_over_when_promoted(pair):
    assert one(pair.dsn, "select inet_server_port(), pg_is_in_recovery()") == (
        pair.primary.port,
        False,
    )
    assert one(
        pair.primary.dsn,
        "select sync_state, state from pg_stat_replication where application_name = 'standby1'",
    ) == ("sync", "streaming")
    with psycopg.connect(pair.dsn, autocommit=True) as conn:
        conn.execute("create table acked (id int primary key, note text)")
        for i in range(1, 51):
            conn.execute("insert into acked values (%s, 'committed on the primary')", [i])
    # a synchronous commit returned once the standby had flushed it; applying it
    # follows at once
    replay = "select count(*) from acked"
    with psycopg.connect(pair.standby.dsn, autocommit=True) as standby:
        assert one(pair.standby.dsn, "select pg_is_in_recovery()") == (True,)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(psycopg.errors.UndefinedTable):
                if standby.execute(replay).fetchone() == (50,):
                    break
            time.sleep(0.01)
        assert standby.execute(replay).fetchone() == (50,)

    pair.stop_primary()
    with pytest.raises(psycopg.OperationalError):  # no writable node until the promotion
        psycopg.connect(pair.dsn).close()
    pair.promote()

    with psycopg.connect(pair.dsn, autocommit=True) as conn:
        row = conn.execute("select inet_server_port(), pg_is_in_recovery()").fetchone()
        assert row == (pair.standby.port, False)
        assert conn.execute("select count(*) from acked").fetchone() == (50,)
        conn.execute("insert into acked values (51, 'written on the promoted standby')")
        assert conn.execute("select max(id) from acked").fetchone() == (51,)
