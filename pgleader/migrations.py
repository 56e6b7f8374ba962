"""Apply each installed schema stream, in order, safely from many instances at once.

A stream is one product's schema: a directory with `migrations/NNN_name.sql`
(versioned: applied once each, in order, never edited once released) and
`functions.sql` (repeatable: the current definition of every function and view,
applied after the versioned files and again whenever its text is new). The
library's stream (sql/pgleader) is built in; a package adds its own through the
entry point group ``pgleader.migrations`` (the gateway: ``service.schema:stream``),
so this module never imports one. `migrate` applies the library's first.

Each file runs in its own transaction together with its record in
pgleader.schema_migrations. A session advisory lock serialises concurrent
runners, so instances that start together apply every file exactly once. A versioned file
changed after it was applied is reported, never silently re-run. A text of
functions.sql applied once and superseded since is not applied again: an older
release starting during a rolling upgrade must not undo newer definitions. The
functions are applied again, whatever their text, after a versioned file of their
stream ran (it may have dropped one to change it).

A database migrated before there were streams (sql/001-006 of 0.1) has the
tables of the streams' first versioned files already (they create them only if
missing) and older functions (functions.sql replaces them). Its record table,
pgleader.migrations, is left as it is: an instance of 0.1 that starts during the
upgrade reads it, finds its six files applied, and changes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import psycopg
from psycopg import AsyncConnection

from pgleader.connect import connect
from pgleader.errors import MigrationError
from pgleader.sqlfiles import sql_dir

__all__ = [
    "ENTRY_POINT_GROUP",
    "Migration",
    "Stream",
    "installed_streams",
    "library_stream",
    "migrate",
    "pending",
]

ENTRY_POINT_GROUP = "pgleader.migrations"
FUNCTIONS_FILE = "functions.sql"

_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_STREAM_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_RUNNER_LOCK = "select pg_advisory_lock(1885826148, 0)"  # lock_namespace(), lock_id 0
_RUNNER_UNLOCK = "select pg_advisory_unlock(1885826148, 0)"
_RECORDED = "select to_regclass('pgleader.schema_migrations') is not null"
_RECORDS = "select stream, version, name, checksum from pgleader.schema_migrations"
_BOOTSTRAP = """
create schema if not exists pgleader;
create table if not exists pgleader.schema_migrations (
    stream     text not null,
    version    text,          -- NNN of a versioned file; null for functions.sql
    name       text not null,
    checksum   text not null,
    applied_at timestamptz not null default now(),
    primary key (stream, name, checksum),
    unique (stream, version)
);
comment on table pgleader.schema_migrations is
    'What pgleader migrate applied, per stream: each versioned file once (version NNN), '
    'each text of functions.sql it applied (version null; the newest applied_at is current).'
"""
_RECORD = """
insert into pgleader.schema_migrations (stream, version, name, checksum) values (%s, %s, %s, %s)
on conflict (stream, name, checksum) do update set applied_at = now()
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One file of a stream; `version` is None for the stream's functions.sql."""

    stream: str
    version: str | None
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.stream}/{self.name}"


@dataclass(frozen=True, slots=True)
class Stream:
    """A product's schema: `directory` holds migrations/NNN_name.sql and functions.sql."""

    name: str
    directory: Path

    def __post_init__(self) -> None:
        if not _STREAM_NAME.match(self.name):
            raise MigrationError(f"{self.name!r} cannot name a migration stream")

    def migrations(self) -> list[Migration]:
        """The versioned files in order, then functions.sql if there is one."""
        found = []
        for path in sorted((self.directory / "migrations").glob("*.sql")):
            match = _FILE.match(path.name)
            if not match:
                raise MigrationError(f"{path}: a migration is named NNN_lower_case.sql")
            found.append(Migration(self.name, match.group(1), path.name, path.read_text()))
        versions = [m.version for m in found]
        if len(set(versions)) != len(versions):
            raise MigrationError(f"two migration files share a number in {self.directory}")
        functions = self.directory / FUNCTIONS_FILE
        if functions.is_file():
            found.append(Migration(self.name, None, FUNCTIONS_FILE, functions.read_text()))
        if not found:
            raise MigrationError(f"migration stream {self.name!r}: nothing in {self.directory}")
        return found


def library_stream() -> Stream:
    """pgleader's own: elections, fencing, history."""
    return Stream("pgleader", sql_dir() / "pgleader")


def installed_streams(only: Collection[str] | None = None) -> list[Stream]:
    """The library's stream, then every stream installed under the entry point group
    (by name); `only` keeps the named ones. A stream that cannot be loaded is an
    error, not skipped: migrating without it would leave its schema behind."""
    streams = [library_stream(), *_plugged_in()]
    names = [s.name for s in streams]
    if len(set(names)) != len(names):
        raise MigrationError(f"two migration streams share a name: {', '.join(names)}")
    if only is not None:
        unknown = set(only) - set(names)
        if unknown:
            raise MigrationError(
                f"no migration stream named {', '.join(sorted(unknown))};"
                f" installed: {', '.join(names)}"
            )
        streams = [s for s in streams if s.name in only]
    return streams


@functools.cache
def _plugged_in() -> tuple[Stream, ...]:
    """The streams of the entry point group, looked up once per process (the lookup
    costs milliseconds, and /ready asks at every probe)."""
    streams = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        try:
            stream = ep.load()
        except Exception as exc:
            raise MigrationError(f"migration stream {ep.name!r} cannot be loaded: {exc}") from exc
        if not isinstance(stream, Stream) or stream.name != ep.name:
            raise MigrationError(f"entry point {ep.value!r} is not the Stream {ep.name!r}")
        streams.append(stream)
    return tuple(streams)


@dataclass(slots=True)
class _Records:
    """What pgleader.schema_migrations says was applied."""

    versions: dict[tuple[str, str], str] = field(default_factory=dict)  # -> checksum
    texts: set[tuple[str, str, str]] = field(default_factory=set)  # (stream, name, checksum)


async def _read_records(conn: AsyncConnection[Any]) -> _Records:
    records = _Records()
    cur = await conn.execute(_RECORDED)
    row = await cur.fetchone()
    if row is None or not row[0]:
        return records
    cur = await conn.execute(_RECORDS)
    for stream, version, name, checksum in await cur.fetchall():
        if version is None:
            records.texts.add((stream, name, checksum))
        else:
            records.versions[(stream, version)] = checksum
    return records


def _missing(stream: Stream, records: _Records, *, strict: bool) -> list[Migration]:
    """The files of `stream` still to apply. With `strict`, an applied versioned file
    changed on disk is an error. functions.sql is missing when its text is new, or
    when a versioned file of its stream is."""
    missing: list[Migration] = []
    for m in stream.migrations():
        if m.version is None:
            if missing or (m.stream, m.name, m.checksum) not in records.texts:
                missing.append(m)
            continue
        applied = records.versions.get((m.stream, m.version))
        if applied is None:
            missing.append(m)
        elif strict and applied != m.checksum:
            raise MigrationError(
                f"{m.label} changed after it was applied; add a new migration instead"
            )
    return missing


async def pending(
    conn: AsyncConnection[Any], streams: Sequence[Stream] | None = None
) -> list[Migration]:
    """What `migrate` would apply to the installed streams (or to `streams`)."""
    streams = installed_streams() if streams is None else streams
    records = await _read_records(conn)
    return [m for stream in streams for m in _missing(stream, records, strict=False)]


async def migrate(
    dsn: str, streams: Sequence[Stream] | None = None, *, only: Collection[str] | None = None
) -> list[str]:
    """Apply what is missing of every installed stream (the library's first), or of
    `streams`, or of the installed ones named in `only`. Returns the files applied
    by this call, as stream/file."""
    streams = installed_streams(only) if streams is None else list(streams)
    conn = await connect(dsn, autocommit=True)
    try:
        # Read-only first: an up-to-date database needs no lock and no DDL rights, so
        # a least-privilege role may run this at start-up.
        records = await _read_records(conn)
        if not any(_missing(s, records, strict=True) for s in streams):
            return []
        await conn.execute(_RUNNER_LOCK)
        try:
            await conn.execute(_BOOTSTRAP)
            records = await _read_records(conn)
            done = []
            for stream in streams:
                for m in _missing(stream, records, strict=True):
                    await _apply(conn, m)
                    done.append(m.label)
            return done
        finally:
            await conn.execute(_RUNNER_UNLOCK)
    finally:
        await conn.close()


async def _apply(conn: AsyncConnection[Any], m: Migration) -> None:
    try:
        async with conn.transaction():
            await conn.execute(m.sql.encode())
            await conn.execute(_RECORD, [m.stream, m.version, m.name, m.checksum])
    except psycopg.Error as exc:
        raise MigrationError(f"{m.label} failed: {str(exc).strip()}") from exc
