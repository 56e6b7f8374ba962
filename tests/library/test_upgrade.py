"""A database migrated by pgleader 0.1 (sql/001-006, one stream of six files) upgrades
to the streams with `pgleader migrate`: nothing lost, and the schema it ends with is
exactly that of a fresh install.

tests/library/legacy_sql/ is a frozen copy of 0.1's six files; `migrate_as_0_1` does
what 0.1's runner did with them, `pending_for_0_1` what it asked at every start.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgleader import Elector, Timings, migrate

LEGACY = Path(__file__).parent / "legacy_sql"
# The record table as 0.1's runner created it.
BOOTSTRAP_0_1 = """
create schema if not exists pgleader;
create table if not exists pgleader.migrations (
    version    text primary key,
    name       text not null,
    checksum   text not null,
    applied_at timestamptz not null default now()
)
"""
SCHEMAS = ["pgleader", "gateway"]
TABLES = {  # what an upgrade must keep, each in the order of its key
    "pgleader.election": "name",
    "pgleader.instances": "election, instance_id",
    "pgleader.leadership_history": "id",
    "gateway.signals": "id",
    "gateway.orders": "id",
    "gateway.positions": "id",
    "gateway.alerts": "id",
    "gateway.paper_broker_requests": "id",
}


@pytest.fixture
def bare(dsn: str) -> Iterator[Callable[[str], str]]:
    """bare(suffix) -> the DSN of a new database with no schema at all; dropped after."""
    made: list[sql.Identifier] = []

    def make(suffix: str) -> str:
        name = f"{conninfo_to_dict(dsn)['dbname']}_{suffix}"
        ident = sql.Identifier(name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(ident))
            conn.execute(sql.SQL("create database {}").format(ident))
        made.append(ident)
        return make_conninfo(dsn, dbname=name)

    yield make
    with psycopg.connect(dsn, autocommit=True) as conn:
        for ident in made:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(ident))


def migrate_as_0_1(dsn: str) -> None:
    """0.1's runner: each file in its own transaction with its record."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(BOOTSTRAP_0_1)
        for path in sorted(LEGACY.glob("*.sql")):
            text = path.read_text()
            with conn.transaction():
                conn.execute(text.encode())
                conn.execute(
                    "insert into pgleader.migrations (version, name, checksum) values (%s, %s, %s)",
                    [path.name[:3], path.name, hashlib.sha256(text.encode()).hexdigest()],
                )


def pending_for_0_1(dsn: str) -> list[str]:
    """What 0.1's runner would apply, or refuse as changed, at an instance's start."""
    with psycopg.connect(dsn) as conn:
        applied = dict(conn.execute("select version, checksum from pgleader.migrations"))
    return [
        path.name
        for path in sorted(LEGACY.glob("*.sql"))
        if applied.get(path.name[:3]) != hashlib.sha256(path.read_bytes()).hexdigest()
    ]


def work_as_0_1(dsn: str) -> None:
    """What 0.1's instances leave in a database: two leaderships (one resigned, one
    still open), executed entries and an exit, an expired and a rejected signal with
    their alerts, an order left in flight."""
    with (
        psycopg.connect(dsn, autocommit=True) as first,
        psycopg.connect(dsn, autocommit=True) as second,
    ):

        def one(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
            row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
            assert row is not None
            return row[0]

        def lead(conn: psycopg.Connection[Any], instance: str) -> int:
            lock_id = one(
                conn, "select pgleader.join_election('gateway', %s, 'host', 1, '0.1.0')", [instance]
            )
            conn.execute("select pg_advisory_lock(pgleader.lock_namespace(), %s)", [lock_id])
            return int(
                one(
                    conn,
                    "select epoch from pgleader.take_leadership('gateway', %s, 'host')",
                    [instance],
                )
            )

        def store(type_: str, instrument: str, lots: int, age: str = "0 s") -> int:
            return int(
                one(
                    first,
                    "insert into gateway.signals (fingerprint, type, instrument, position, lots,"
                    " price, stop, signal_at, payload, received_by)"
                    " values (md5(random()::text), %s, %s, 'Long_1', %s, 100.5, 99, now() - %s::interval,"
                    " '{\"v\": 1}', 'old-1') returning id",
                    [type_, instrument, lots, age],
                )
            )

        def execute(epoch: int, ids: list[int], fill: bool = True) -> None:
            rows = first.execute(
                "select client_order_id, instrument, action, quantity from"
                " gateway.claim_signals('gateway', %s, %s, 'old-1', 'paper', '5 minutes')"
                " where client_order_id is not null",
                [epoch, ids],
            ).fetchall()
            for coid, instrument, action, quantity in rows:
                first.execute(
                    "insert into gateway.paper_broker_requests (client_order_id, instrument,"
                    " action, quantity, epoch, instance_id) values (%s, %s, %s, %s, %s, 'old-1')",
                    [coid, instrument, action, quantity, epoch],
                )
            if fill:
                coids = [r[0] for r in rows]
                first.execute(
                    "select gateway.complete_orders(%s, %s, %s, %s)",
                    [
                        coids,
                        ["filled"] * len(coids),
                        [f"B-{c}" for c in coids],
                        ["ok"] * len(coids),
                    ],
                )

        epoch = lead(first, "old-1")
        entries = [store("BASE_ENTRY", "NIFTY", 2), store("PYRAMID", "NIFTY", 1)]
        entries += [store("BASE_ENTRY", "BANKNIFTY", 1), store("BASE_ENTRY", "CRUDE", 1, "1 day")]
        entries.append(store("EXIT", "GOLD", 0))  # no position: rejected
        execute(epoch, entries)
        execute(epoch, [store("EXIT", "NIFTY", 0)])
        execute(epoch, [store("BASE_ENTRY", "SILVER", 3)], fill=False)  # in flight
        assert one(first, "select pgleader.resign('gateway', 'old-1', %s, 'upgrade')", [epoch])
        assert lead(second, "old-2") == epoch + 1  # its history row stays open


def snapshot(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return {
            table: one_text(
                conn,
                sql.SQL("select coalesce(json_agg(t order by {})::text, '[]') from {} t").format(
                    sql.SQL(order), sql.Identifier(*table.split("."))
                ),
            )
            for table, order in TABLES.items()
        }


def parsed(snap: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {table: json.loads(text) for table, text in snap.items()}


def same_columns(after: dict[str, str], before: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """`after`'s rows with the columns `before` had: a migration may add a column (its
    default then fills every old row), never change or lose a value."""
    old = parsed(before)
    return {
        table: [{key: row[key] for key in (old[table][0] if old[table] else row)} for row in rows]
        for table, rows in parsed(after).items()
    }


def one_text(conn: psycopg.Connection[Any], query: sql.Composable) -> str:
    row = conn.execute(query).fetchone()
    assert row is not None
    return str(row[0])


CATALOG = {
    "schemas": "select nspname, pg_get_userbyid(nspowner), nspacl::text from pg_namespace"
    " where nspname = any(%(schemas)s) order by 1",
    "relations": "select c.oid::regclass::text, c.relkind, pg_get_userbyid(c.relowner),"
    " c.relacl::text, obj_description(c.oid, 'pg_class')"
    " from pg_class c join pg_namespace n on n.oid = c.relnamespace"
    " where n.nspname = any(%(schemas)s) order by 1",
    "columns": "select a.attrelid::regclass::text, a.attnum, a.attname,"
    " format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity, a.attgenerated,"
    " pg_get_expr(d.adbin, d.adrelid), col_description(a.attrelid, a.attnum)"
    " from pg_attribute a join pg_class c on c.oid = a.attrelid"
    " join pg_namespace n on n.oid = c.relnamespace"
    " left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum"
    " where n.nspname = any(%(schemas)s) and a.attnum > 0 and not a.attisdropped order by 1, 2",
    "constraints": "select conrelid::regclass::text, conname, pg_get_constraintdef(c.oid)"
    " from pg_constraint c join pg_namespace n on n.oid = c.connamespace"
    " where n.nspname = any(%(schemas)s) order by 1, 2",
    "indexes": "select schemaname, tablename, indexname, indexdef from pg_indexes"
    " where schemaname = any(%(schemas)s) order by 1, 2, 3",
    "sequences": "select schemaname, sequencename, data_type::text, start_value, min_value,"
    " max_value, increment_by, cycle from pg_sequences"
    " where schemaname = any(%(schemas)s) order by 1, 2",
    "functions": "select p.oid::regprocedure::text, pg_get_functiondef(p.oid),"
    " pg_get_userbyid(p.proowner), p.proacl::text, obj_description(p.oid, 'pg_proc')"
    " from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
    " where n.nspname = any(%(schemas)s) order by 1",
    "views": "select c.oid::regclass::text, pg_get_viewdef(c.oid)"
    " from pg_class c join pg_namespace n on n.oid = c.relnamespace"
    " where n.nspname = any(%(schemas)s) and c.relkind in ('v', 'm') order by 1",
    "triggers": "select tgrelid::regclass::text, tgname, pg_get_triggerdef(t.oid)"
    " from pg_trigger t join pg_class c on c.oid = t.tgrelid"
    " join pg_namespace n on n.oid = c.relnamespace"
    " where n.nspname = any(%(schemas)s) and not t.tgisinternal order by 1, 2",
    "records": "select stream, version, name, checksum from pgleader.schema_migrations"
    " order by 1, 3, 4",
}
# 0.1's record table and what belongs to it: kept by an upgrade, absent from a fresh install.
_OF_0_1 = re.compile(r"^pgleader\.migrations(_pkey)?$")


def catalog(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Everything of the two schemas a migration defines, without oids or data."""
    with psycopg.connect(dsn) as conn:
        return {
            part: [
                row
                for row in conn.execute(query, {"schemas": SCHEMAS}).fetchall()  # type: ignore[arg-type]
                if not (_OF_0_1.match(str(row[0])) or row[:2] == ("pgleader", "migrations"))
            ]
            for part, query in CATALOG.items()
        }


async def test_a_database_of_0_1_upgrades_with_nothing_lost_to_a_fresh_install(bare):
    old, fresh = bare("of_0_1"), bare("fresh")
    migrate_as_0_1(old)
    work_as_0_1(old)
    before = snapshot(old)
    assert '"status":"executed"' in before["gateway.signals"]  # the work above happened
    assert '"status":"closed"' in before["gateway.positions"]

    applied = await migrate(old)
    assert applied == [
        "pgleader/001_election.sql",
        "pgleader/002_jobs.sql",
        "pgleader/003_switchover.sql",
        "pgleader/functions.sql",
        "gateway/001_gateway.sql",
        "gateway/002_targets.sql",
        "gateway/003_paper_book_index.sql",
        "gateway/004_leader_jobs.sql",
        "gateway/005_alert_deliveries.sql",
        "gateway/006_open_signals_index.sql",
        "gateway/007_rewind_guard.sql",
        "gateway/008_exits_index.sql",
        "gateway/functions.sql",
    ]
    assert await migrate(old) == []
    assert same_columns(snapshot(old), before) == parsed(before)

    await migrate(fresh)
    upgraded, installed = catalog(old), catalog(fresh)
    for part in CATALOG:
        assert upgraded[part] == installed[part], part
    assert all(installed[part] for part in CATALOG if part != "triggers"), installed

    # 0.1's record stays as it was: an instance of 0.1 restarting mid-upgrade (a
    # rolling one) finds its six files applied and changes nothing.
    assert pending_for_0_1(old) == []
    with psycopg.connect(old) as conn:
        assert conn.execute("select count(*) from pgleader.migrations").fetchone() == (6,)


async def test_an_upgraded_database_goes_on_where_0_1_left_off(bare):
    old = bare("of_0_1")
    migrate_as_0_1(old)
    work_as_0_1(old)
    await migrate(old)
    async with Elector(old, "gateway", instance_id="new", timings=Timings(0.2, 0.6, 1.2)) as e:
        epoch = await e.wait_for_leadership(10)
        assert epoch == 3  # after 0.1's two: never goes back
        with psycopg.connect(old, autocommit=True) as conn:
            sid = conn.execute(
                "insert into gateway.signals (fingerprint, type, instrument, position, lots,"
                " price, signal_at, payload, received_by)"
                " values ('after-upgrade', 'EXIT', 'BANKNIFTY', 'Long_1', 0, 100, now(), '{}',"
                " 'new') returning id"
            ).fetchone()[0]
            row = conn.execute(
                "select status, client_order_id, action, start_position, target_position"
                " from gateway.claim_signals('gateway', %s, %s, 'new', 'paper', '5 minutes',"
                " null, '0 s', 'wait')",
                [epoch, [sid]],
            ).fetchone()
            # 0.1's open long of 1 lot (side long by default), closed to flat
            assert row == ("executing", f"pgl-{sid}-e3-1", "SELL", 1, 0)
    with psycopg.connect(old) as conn:
        reasons = conn.execute(
            "select epoch, release_reason from pgleader.leadership_history order by epoch"
        ).fetchall()
    assert reasons == [(1, "upgrade"), (2, "session_ended"), (3, "shutdown")]
