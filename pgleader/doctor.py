"""`pgleader doctor`: whether a deployment keeps the promises the README makes.

Each check is one `Finding`: ok, warn or fail, and in its detail what to change.
The promises rest on the database: a session advisory lock that is real (a
direct connection, never through a transaction-mode pooler, which runs each
statement on whichever server connection is free), commits that survive the
loss of the server (`synchronous_commit`) and of the primary (a synchronous
standby: with an asynchronous one, a failover can lose the last commits, an
epoch bump among them, so one epoch is handed out twice), commit times for the
audit (`track_commit_timestamp`), a supported server, and a primary to write to.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pgleader.connect import connect
from pgleader.queries import QUERIES

__all__ = ["MIN_SERVER_VERSION", "Finding", "diagnose", "failed"]

MIN_SERVER_VERSION = 14  # the oldest PostgreSQL major version pgleader supports

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Finding:
    """One check's outcome: its name, ok/warn/fail, and what it saw and what to change."""

    check: str
    status: Status
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return f"{self.status:<4}  {self.check:<25}  {self.detail}"


def failed(findings: list[Finding]) -> bool:
    return any(f.status == "fail" for f in findings)


async def diagnose(dsn: str, *, timeout: float = 5.0) -> list[Finding]:
    """Every check against the server `dsn` reaches (DatabaseUnavailable when none)."""
    findings = [await _direct_connection(dsn, timeout)]
    async with await connect(dsn, timeout=timeout, autocommit=True) as conn:
        cur = await conn.execute(QUERIES["doctor_server"])
        server = await cur.fetchone()
        cur = await conn.execute(QUERIES["doctor_standbys"])
        standbys = await cur.fetchall()
    assert server is not None  # one row, always
    version_num, version, in_recovery, sync_commit, sync_names, commit_ts = server
    replicated = bool(standbys)
    findings += [
        _server_version(version_num, version),
        _primary(in_recovery),
        _synchronous_commit(sync_commit, replicated),
        _synchronous_standbys(sync_names, standbys, in_recovery),
        _commit_timestamps(commit_ts),
    ]
    return findings


async def _direct_connection(dsn: str, timeout: float) -> Finding:
    """A session lock taken on one connection must show, from a second connection, as
    granted to the first one's backend; and that backend must stay the first
    connection's own. Through a transaction-mode pooler, statements of both
    connections share server sessions, and the lock outlives its client's turn."""
    name = "direct connection"
    k1, k2 = secrets.randbelow(2**31 - 1) + 1, secrets.randbelow(2**31 - 1) + 1
    keys = {"k1": k1, "k2": k2}
    async with await connect(dsn, timeout=timeout, autocommit=True) as first:
        cur = await first.execute(QUERIES["doctor_take_lock"], keys)
        row = await cur.fetchone()
        assert row is not None
        holder, locked = row
        if not locked:  # another session holds these random keys: vanishingly rare
            return Finding(name, "warn", "could not take a test lock; run doctor again")
        async with await connect(dsn, timeout=timeout, autocommit=True) as second:
            cur = await second.execute(QUERIES["doctor_lock_seen"], {"holder": holder, **keys})
            seen_row = await cur.fetchone()
        cur = await first.execute(QUERIES["doctor_backend_pid"])
        again = await cur.fetchone()
        cur = await first.execute(QUERIES["doctor_release_lock"], keys)
        released = await cur.fetchone()
    assert seen_row is not None and again is not None and released is not None
    other, seen = seen_row
    problems = []
    if again[0] != holder:
        problems.append(f"the first connection's backend changed ({holder} -> {again[0]})")
    if other == holder:
        problems.append("two connections were served by the same backend")
    if not seen:
        problems.append("the lock was not seen held by its session's backend")
    if not released[0]:
        problems.append("the lock could not be released by the session that took it")
    if problems:
        return Finding(
            name, "fail",
            "a session advisory lock is not held by its own session (" + "; ".join(problems)
            + "): a pooler in transaction mode is in between; give the instances a direct"
            " connection to PostgreSQL (or a session-mode pool) for the election and LISTEN",
        )  # fmt: skip
    return Finding(name, "ok", f"a session advisory lock is held by its own backend ({holder})")


def _server_version(version_num: int, version: str) -> Finding:
    major = version_num // 10000
    if major < MIN_SERVER_VERSION:
        return Finding(
            "server version", "fail",
            f"PostgreSQL {version} is not supported: upgrade to {MIN_SERVER_VERSION} or newer",
        )  # fmt: skip
    return Finding(
        "server version", "ok", f"PostgreSQL {version} (supported: {MIN_SERVER_VERSION} and newer)"
    )


def _primary(in_recovery: bool) -> Finding:
    if in_recovery:
        return Finding(
            "primary", "fail",
            "this server is a standby (in recovery, read-only): point the DSN at the primary,"
            " or list every node with target_session_attrs=read-write",
        )  # fmt: skip
    return Finding("primary", "ok", "the server accepts writes (not in recovery)")


def _synchronous_commit(value: str, replicated: bool) -> Finding:
    name = "synchronous_commit"
    if value == "off":
        return Finding(
            name, "fail",
            "off: a crash loses the last commits (signals already answered, an epoch bump);"
            " set synchronous_commit = on",
        )  # fmt: skip
    if value == "local" and replicated:
        return Finding(
            name, "fail",
            "local on a replicated primary: a commit does not wait for the standby, so a"
            " failover can lose it; set synchronous_commit = on",
        )  # fmt: skip
    if value == "remote_write":
        return Finding(
            name, "ok",
            "remote_write: a commit waits until the standby has it in memory (on or"
            " remote_apply also survive the standby's crash)",
        )  # fmt: skip
    return Finding(name, "ok", value)


def _synchronous_standbys(names: str, standbys: list[tuple[Any, ...]], standby: bool) -> Finding:
    check = "synchronous_standby_names"
    if standby:
        return Finding(check, "warn", "not checked: this server is a standby; ask the primary")
    listed = ", ".join(f"{app or '?'} ({state or '?'})" for app, _, state in standbys)
    synchronous = [row for row in standbys if row[2] in ("sync", "quorum")]
    if not standbys:
        if names.strip():
            return Finding(
                check, "fail",
                f"set to {names!r} but no standby is connected: every commit waits for one;"
                " start the standby or empty the setting",
            )  # fmt: skip
        return Finding(
            check, "ok",
            "no standby streams from this server (a lone server: only a restore replaces it)",
        )  # fmt: skip
    if not names.strip():
        return Finding(
            check, "fail",
            f"empty, with asynchronous standbys: {listed}. A failover to one can lose the last"
            " commits (an epoch handed out twice, signals answered 2xx lost): name them in"
            " synchronous_standby_names (Patroni: synchronous_mode: true), or never promote them",
        )  # fmt: skip
    if all(row[2] is None for row in standbys):
        return Finding(
            check, "warn",
            f"{names!r}, but the standbys' sync state is hidden from this role: grant it"
            " pg_monitor to check",
        )  # fmt: skip
    if not synchronous:
        return Finding(
            check, "fail",
            f"{names!r} matches none of the standbys ({listed}): every commit waits; name the"
            " standbys by their application_name",
        )  # fmt: skip
    if len(synchronous) < len(standbys):
        return Finding(
            check, "warn",
            f"{names!r}; standbys: {listed}. Fail over only to a synchronous one: an"
            " asynchronous standby can lack the last commits",
        )  # fmt: skip
    return Finding(check, "ok", f"{names!r}; standbys: {listed}")


def _commit_timestamps(value: str) -> Finding:
    if value != "on":
        return Finding(
            "track_commit_timestamp", "warn",
            "off: the leadership history cannot tell when each epoch became current (the"
            " commit time of its bump); set track_commit_timestamp = on (needs a restart)",
        )  # fmt: skip
    return Finding("track_commit_timestamp", "ok", "on")
