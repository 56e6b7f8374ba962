"""Opening connections: the dedicated lock session, and plain ones with clear errors."""

from __future__ import annotations

import math
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgleader.config import Timings
from pgleader.errors import DatabaseUnavailable, first_line

__all__ = ["CLIENT_CHECK_MS", "connect", "describe_dsn", "lock_session_conninfo", "with_settings"]

# How often the server looks, while a lock session's statement runs, whether its client
# is still there (client_connection_check_interval). A follower's one statement waits
# on the lock and claims once it is granted (pgleader.campaign): the session of an
# instance that died while it waited must end before it can be granted the lock and
# claim for nobody. A look costs the waiting backend a poll(); 50 a second is nothing.
CLIENT_CHECK_MS = 20


def describe_dsn(dsn: str) -> str:
    """host:port/dbname of a DSN, without user or password, for messages and logs."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or ''}"


def with_settings(dsn: str, **settings: object) -> str:
    """The DSN with server settings added to its `options` (-c name=value), keeping any there."""
    extra = " ".join(f"-c {name}={value}" for name, value in settings.items())
    existing = conninfo_to_dict(dsn).get("options")
    return make_conninfo(dsn, options=f"{existing} {extra}" if existing else extra)


def lock_session_conninfo(dsn: str, timings: Timings, application_name: str) -> str:
    """Conninfo of a lock session: keepalives on both ends so a vanished peer is noticed
    in seconds (default TCP keepalive notices after ~2 h 11 min), never a pooler's."""
    idle = max(1, math.floor(timings.evict_after / 3))
    user_timeout_ms = int(timings.evict_after * 1000)
    server = with_settings(
        dsn,
        tcp_keepalives_idle=idle,
        tcp_keepalives_interval=1,
        tcp_keepalives_count=3,
        tcp_user_timeout=user_timeout_ms,
        client_connection_check_interval=CLIENT_CHECK_MS,
        statement_timeout=0,
        idle_in_transaction_session_timeout=0,
    )
    return make_conninfo(
        server,
        application_name=application_name[:63],
        keepalives=1,
        keepalives_idle=idle,
        keepalives_interval=1,
        keepalives_count=3,
        tcp_user_timeout=user_timeout_ms,
    )


async def connect(conninfo: str, *, timeout: float = 5.0, **kwargs: Any) -> AsyncConnection[Any]:
    """Connect, turning every failure into DatabaseUnavailable with a one-line reason."""
    try:
        return await AsyncConnection.connect(
            conninfo, connect_timeout=max(2, math.ceil(timeout)), **kwargs
        )
    except psycopg.Error as exc:
        # libpq says "connection failed: connection to server at ... failed: <why>"
        reason = first_line(exc).rsplit("failed: ", 1)[-1].strip()
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {describe_dsn(conninfo)}: {reason}"
        ) from exc
