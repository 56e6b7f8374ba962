"""The suite's PostgreSQL: always real, always one this run may own.

With PGLEADER_TEST_DSN set, tests use that server (pytest-postgresql "noproc").
Otherwise the suite starts a throwaway server of its own from the local
binaries (pgleader.embedded: as root, the server process runs as the
`postgres` system user, since PostgreSQL refuses to run as root). Migrations
are loaded once into a template database; every test gets a fresh copy.
Tests that stop or kill a server start their own (fixture `own_server`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool
from pytest_postgresql import factories

from pgleader import Elector, Timings
from pgleader.embedded import EmbeddedPostgres
from pgleader.migrations import migrate
from service.brokers.paper import PaperBroker
from service.execution.executor import Executor

_SERVER: EmbeddedPostgres | None = None
_TMP: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _SERVER, _TMP
    dsn = os.environ.get("PGLEADER_TEST_DSN")
    if dsn:
        params = conninfo_to_dict(dsn)
    else:
        _TMP = tempfile.mkdtemp(prefix="pgleader-test-")
        os.chmod(_TMP, 0o755)
        _SERVER = EmbeddedPostgres(Path(_TMP) / "pg")
        _SERVER.start()
        params = conninfo_to_dict(_SERVER.dsn)
    config.option.postgresql_host = params.get("host", "127.0.0.1")
    config.option.postgresql_port = int(params.get("port", 5432))
    config.option.postgresql_user = params.get("user", "postgres")
    config.option.postgresql_password = params.get("password")
    config.option.postgresql_dbname = "pgleader_test"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SERVER is not None:
        _SERVER.stop("immediate")
    if _TMP is not None:
        shutil.rmtree(_TMP, ignore_errors=True)


def load_migrations(**kwargs: Any) -> None:
    kwargs.pop("autocommit", None)
    asyncio.run(migrate(make_conninfo(**{k: v for k, v in kwargs.items() if v is not None})))


pg_template = factories.postgresql_noproc(load=[load_migrations])
postgresql = factories.postgresql("pg_template")


@pytest.fixture
def dsn(postgresql: psycopg.Connection[Any]) -> str:
    """DSN of this test's own fresh database, migrations applied."""
    info = postgresql.info
    return make_conninfo(
        host=info.host, port=info.port, user=info.user, dbname=info.dbname,
        password=info.password or None,
    )  # fmt: skip


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection to this test's database, for assertions."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def own_server() -> Iterator[EmbeddedPostgres]:
    """A server this test owns alone: it may stop, restart or kill it. Migrations applied."""
    tmp = tempfile.mkdtemp(prefix="pgleader-own-")
    os.chmod(tmp, 0o755)
    server = EmbeddedPostgres(Path(tmp) / "pg")
    server.start()
    asyncio.run(migrate(server.dsn))
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def empty_database_dsn(dsn: str) -> Iterator[str]:
    """A database with no schema at all, next to this test's database; dropped after."""
    plain = f"{conninfo_to_dict(dsn)['dbname']}_bare"
    name = psycopg.sql.Identifier(plain)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("drop database if exists {} with (force)").format(name))
        conn.execute(psycopg.sql.SQL("create database {}").format(name))
    yield make_conninfo(dsn, dbname=plain)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("drop database if exists {} with (force)").format(name))


@pytest.fixture
async def executor_for(dsn):
    """make(broker_cls) -> an in-process Executor whose elector (instance 'new',
    election 'gateway') already leads; all stopped at the end of the test."""
    made = []

    async def make(broker_cls=PaperBroker, **options) -> Executor:
        pool = AsyncConnectionPool(
            dsn, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
        )
        await pool.open()
        elector = Elector(dsn, "gateway", instance_id="new", timings=Timings(0.2, 0.6, 1.2))
        executor = Executor(
            pool,
            elector,
            broker_cls(pool, timeout=1.0),
            max_age=timedelta(minutes=5),
            broker_timeout=0.5,
            lookup_attempts=2,
            **{"settle": 1.0, **options},
        )
        await elector.start()
        await elector.wait_for_leadership(10)
        made.append((pool, elector, executor))
        return executor

    yield make
    for pool, elector, executor in made:
        await executor.stop()
        await elector.stop()
        await pool.close()
