"""Apply sql/NNN_*.sql in order, once each, safely from many instances at once.

Each file runs in its own transaction together with its record in
pgleader.migrations. A session advisory lock serialises concurrent runners, so
instances that start together apply every file exactly once. A file changed
after it was applied is reported, never silently re-run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import AsyncConnection

from pgleader.connect import connect
from pgleader.errors import MigrationError
from pgleader.sqlfiles import sql_dir

__all__ = ["Migration", "applied_versions", "discover", "migrate", "pending"]

_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_RUNNER_LOCK = "select pg_advisory_lock(1885826148, 0)"  # lock_namespace(), lock_id 0
_RUNNER_UNLOCK = "select pg_advisory_unlock(1885826148, 0)"
_BOOTSTRAP = """
create schema if not exists pgleader;
create table if not exists pgleader.migrations (
    version    text primary key,
    name       text not null,
    checksum   text not null,
    applied_at timestamptz not null default now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match:
            found.append(Migration(match.group(1), path.name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a number in {directory}")
    return found


async def applied_versions(conn: AsyncConnection[Any]) -> dict[str, str]:
    """version -> checksum of what is applied; empty when nothing is."""
    cur = await conn.execute("select to_regclass('pgleader.migrations') is not null")
    row = await cur.fetchone()
    if not row or not row[0]:
        return {}
    cur = await conn.execute("select version, checksum from pgleader.migrations")
    return {version: checksum for version, checksum in await cur.fetchall()}


def _missing(migrations: list[Migration], applied: dict[str, str]) -> list[Migration]:
    """The migrations still to apply; an applied file changed on disk is an error."""
    for m in migrations:
        if m.version in applied and applied[m.version] != m.checksum:
            raise MigrationError(
                f"{m.name} changed after it was applied; add a new migration instead"
            )
    return [m for m in migrations if m.version not in applied]


async def pending(conn: AsyncConnection[Any], directory: Path | None = None) -> list[Migration]:
    applied = await applied_versions(conn)
    return [m for m in discover(directory) if m.version not in applied]


async def migrate(dsn: str, directory: Path | None = None) -> list[str]:
    """Apply what is missing; returns the names of the files applied by this call."""
    migrations = discover(directory)
    conn = await connect(dsn, autocommit=True)
    try:
        # Read-only first: an up-to-date database needs no lock and no DDL rights, so
        # a least-privilege role may run this at start-up.
        if not _missing(migrations, await applied_versions(conn)):
            return []
        await conn.execute(_RUNNER_LOCK)
        try:
            await conn.execute(_BOOTSTRAP)
            done = []
            for m in _missing(migrations, await applied_versions(conn)):
                try:
                    async with conn.transaction():
                        await conn.execute(m.sql.encode())
                        await conn.execute(
                            "insert into pgleader.migrations (version, name, checksum)"
                            " values (%s, %s, %s)",
                            [m.version, m.name, m.checksum],
                        )
                except psycopg.Error as exc:
                    raise MigrationError(f"{m.name} failed: {str(exc).strip()}") from exc
                done.append(m.name)
            return done
        finally:
            await conn.execute(_RUNNER_UNLOCK)
    finally:
        await conn.close()
