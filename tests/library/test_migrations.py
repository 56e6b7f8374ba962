"""The migration runner: ordered, recorded, idempotent, safe when instances start together."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from pgleader import MigrationError, migrate
from pgleader.migrations import discover


@pytest.fixture
def empty_dsn(empty_database_dsn: str) -> str:
    return empty_database_dsn


async def applied(dsn: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("select name from pgleader.migrations order by version")
        return [r[0] for r in await cur.fetchall()]


async def test_migrate_applies_every_file_in_order_once(empty_dsn):
    files = [m.name for m in discover()]
    assert files == sorted(files) and files
    assert await migrate(empty_dsn) == files
    assert await migrate(empty_dsn) == []
    assert await applied(empty_dsn) == files


async def test_concurrent_runners_apply_each_file_exactly_once(empty_dsn):
    results = await asyncio.gather(*(migrate(empty_dsn) for _ in range(6)))
    flat = [name for names in results for name in names]
    assert sorted(flat) == sorted(m.name for m in discover())
    assert await applied(empty_dsn) == [m.name for m in discover()]


async def test_a_changed_applied_file_is_reported_not_rerun(empty_dsn, tmp_path: Path):
    for m in discover():
        (tmp_path / m.name).write_text(m.sql)
    await migrate(empty_dsn, tmp_path)
    first = sorted(tmp_path.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(empty_dsn, tmp_path)


async def test_a_failing_migration_leaves_nothing_half_applied(empty_dsn, tmp_path: Path):
    for m in discover():
        (tmp_path / m.name).write_text(m.sql)
    (tmp_path / "900_broken.sql").write_text(
        "create table pgleader.half (id int);\nselect * from no_such_table;\n"
    )
    with pytest.raises(MigrationError, match=r"900_broken\.sql failed"):
        await migrate(empty_dsn, tmp_path)
    async with await psycopg.AsyncConnection.connect(empty_dsn) as conn:
        cur = await conn.execute("select to_regclass('pgleader.half')")
        assert await cur.fetchone() == (None,)
    assert "900_broken.sql" not in await applied(empty_dsn)
