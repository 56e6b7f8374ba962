"""The migration runner: streams applied in order, each file recorded once, functions
re-applied when their text is new, safe when instances start together."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import psycopg
import pytest

from pgleader import MigrationError, migrate
from pgleader.cli import main
from pgleader.migrations import Stream, installed_streams, library_stream, pending
from pgleader.sqlfiles import sql_dir


@pytest.fixture
def empty_dsn(empty_database_dsn: str) -> str:
    return empty_database_dsn


def every_file() -> list[str]:
    return [m.label for stream in installed_streams() for m in stream.migrations()]


async def records(dsn: str) -> list[tuple[str, str | None, str]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "select stream, version, name from pgleader.schema_migrations order by applied_at, name"
        )
        return await cur.fetchall()


async def scalar(dsn: str, query: str) -> object:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(query)  # type: ignore[arg-type]
        row = await cur.fetchone()
        return None if row is None else row[0]


def copy_of(stream: Stream, into: Path) -> Stream:
    """The stream's files in a directory of the test's own, to edit."""
    shutil.copytree(stream.directory, into, ignore=shutil.ignore_patterns("queries.sql"))
    return Stream(stream.name, into)


def test_the_gateway_plugs_its_stream_in_after_the_library():
    streams = installed_streams()
    assert [s.name for s in streams] == ["pgleader", "gateway"]
    assert [s.directory for s in streams] == [sql_dir() / "pgleader", sql_dir() / "gateway"]
    assert every_file() == [
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
    assert [s.name for s in installed_streams(only=["gateway"])] == ["gateway"]
    with pytest.raises(MigrationError, match="no migration stream named nope; installed"):
        installed_streams(only=["nope"])


async def test_migrate_applies_every_stream_in_order_once(empty_dsn):
    assert await migrate(empty_dsn) == every_file()
    assert await migrate(empty_dsn) == []
    assert [f"{stream}/{name}" for stream, _, name in await records(empty_dsn)] == every_file()
    async with await psycopg.AsyncConnection.connect(empty_dsn) as conn:
        assert await pending(conn) == []


async def test_only_applies_the_named_stream(empty_dsn):
    assert await migrate(empty_dsn, only=["pgleader"]) == [
        "pgleader/001_election.sql",
        "pgleader/002_jobs.sql",
        "pgleader/003_switchover.sql",
        "pgleader/functions.sql",
    ]
    assert await scalar(empty_dsn, "select to_regclass('gateway.signals')") is None
    async with await psycopg.AsyncConnection.connect(empty_dsn) as conn:
        assert [m.label for m in await pending(conn)] == [
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
    assert await migrate(empty_dsn) == [
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


def test_the_cli_migrates_one_stream_with_only(empty_dsn, capsys):
    assert main(["migrate", "--dsn", empty_dsn, "--only", "pgleader"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "applied": [
            "pgleader/001_election.sql",
            "pgleader/002_jobs.sql",
            "pgleader/003_switchover.sql",
            "pgleader/functions.sql",
        ]
    }
    assert main(["migrate", "--dsn", empty_dsn, "--only", "nope"]) == 2
    assert "no migration stream named nope" in capsys.readouterr().err
    assert main(["migrate", "--dsn", empty_dsn]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "applied": [
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
    }


async def test_concurrent_runners_apply_each_file_exactly_once(empty_dsn):
    results = await asyncio.gather(*(migrate(empty_dsn) for _ in range(6)))
    flat = [name for names in results for name in names]
    assert sorted(flat) == sorted(every_file())
    assert len(await records(empty_dsn)) == len(every_file())


async def test_a_changed_applied_file_is_reported_not_rerun(empty_dsn, tmp_path: Path):
    stream = copy_of(library_stream(), tmp_path / "pgleader")
    await migrate(empty_dsn, [stream])
    first = tmp_path / "pgleader" / "migrations" / "001_election.sql"
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match=r"pgleader/001_election\.sql changed after it"):
        await migrate(empty_dsn, [stream])


async def test_a_failing_migration_leaves_nothing_half_applied(empty_dsn, tmp_path: Path):
    stream = copy_of(library_stream(), tmp_path / "pgleader")
    (tmp_path / "pgleader" / "migrations" / "900_broken.sql").write_text(
        "create table pgleader.half (id int);\nselect * from no_such_table;\n"
    )
    with pytest.raises(MigrationError, match=r"pgleader/900_broken\.sql failed"):
        await migrate(empty_dsn, [stream])
    assert await scalar(empty_dsn, "select to_regclass('pgleader.half')") is None
    assert ("pgleader", "900", "900_broken.sql") not in await records(empty_dsn)


async def test_changed_functions_are_applied_again_with_their_record(empty_dsn, tmp_path):
    stream = copy_of(library_stream(), tmp_path / "pgleader")
    await migrate(empty_dsn, [stream])
    functions = tmp_path / "pgleader" / "functions.sql"
    functions.write_text(
        functions.read_text()
        + "\ncreate or replace function pgleader.probe() returns int language sql as 'select 7';\n"
    )
    assert await migrate(empty_dsn, [stream]) == ["pgleader/functions.sql"]
    assert await scalar(empty_dsn, "select pgleader.probe()") == 7
    texts = [r for r in await records(empty_dsn) if r[2] == "functions.sql"]
    assert len(texts) == 2  # every text applied is on record, the newest last
    assert await migrate(empty_dsn, [stream]) == []


async def test_a_failing_functions_file_changes_nothing(empty_dsn, tmp_path):
    stream = copy_of(library_stream(), tmp_path / "pgleader")
    await migrate(empty_dsn, [stream])
    before = await scalar(empty_dsn, "select pg_get_functiondef('pgleader.heartbeat'::regproc)")
    functions = tmp_path / "pgleader" / "functions.sql"
    functions.write_text(
        functions.read_text().replace("set heartbeat_at = now()", "set heartbeat_at = now() + 0")
        + "\nselect * from no_such_table;\n"
    )
    with pytest.raises(MigrationError, match=r"pgleader/functions\.sql failed"):
        await migrate(empty_dsn, [stream])
    after = await scalar(empty_dsn, "select pg_get_functiondef('pgleader.heartbeat'::regproc)")
    assert after == before
    assert len([r for r in await records(empty_dsn) if r[2] == "functions.sql"]) == 1


async def test_functions_superseded_since_are_never_applied_again(empty_dsn, tmp_path):
    """An instance of an older release, starting during a rolling upgrade, must not
    undo the newer definitions, and counts as migrated."""
    old = copy_of(library_stream(), tmp_path / "old")
    new = copy_of(library_stream(), tmp_path / "new")
    (new.directory / "functions.sql").write_text(
        (old.directory / "functions.sql").read_text()
        + "\ncreate or replace function pgleader.probe() returns int language sql as 'select 2';\n"
    )
    await migrate(empty_dsn, [old])
    assert await migrate(empty_dsn, [new]) == ["pgleader/functions.sql"]
    assert await migrate(empty_dsn, [old]) == []
    async with await psycopg.AsyncConnection.connect(empty_dsn) as conn:
        assert await pending(conn, [old]) == []
    assert await scalar(empty_dsn, "select pgleader.probe()") == 2


async def test_functions_are_applied_again_after_a_versioned_file(empty_dsn, tmp_path):
    """A versioned file may drop a view (to change its table); the functions bring it back."""
    stream = copy_of(library_stream(), tmp_path / "pgleader")
    await migrate(empty_dsn, [stream])
    (stream.directory / "migrations" / "900_drop_the_view.sql").write_text(
        "drop view pgleader.leader;\n"
    )
    assert await migrate(empty_dsn, [stream]) == [
        "pgleader/900_drop_the_view.sql",
        "pgleader/functions.sql",
    ]
    assert await scalar(empty_dsn, "select count(*) from pgleader.leader") == 0
