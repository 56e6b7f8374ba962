"""The fencing rule: act only while your epoch is the election's current epoch.

Two ways to apply it, the same rule:

`check_epoch` runs inside the caller's transaction, on any connection. It reads
the election row FOR SHARE, so a new leader's epoch bump (an UPDATE of that row)
waits for the caller to commit, and every check after the bump sees the new
epoch. Whatever the caller writes in the same transaction is therefore either
committed under a current epoch or not at all.

`fenced_statement` is for one statement that calls the SQL function
`pgleader.check_epoch(election, epoch)` itself (sql/pgleader/functions.sql): no
BEGIN/COMMIT round trips, and a stale epoch raises SQLSTATE PGL01 before the
statement writes anything. The context manager turns that error into `Fenced`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from pgleader.errors import Fenced
from pgleader.queries import QUERIES

__all__ = ["FENCED_SQLSTATE", "check_epoch", "fenced_statement"]

FENCED_SQLSTATE = "PGL01"

_FENCE = QUERIES["read_epoch_for_share"]


async def check_epoch(conn: AsyncConnection[object], election: str, epoch: int) -> None:
    """Raise `Fenced` unless `epoch` is the current epoch of `election`.

    Must be called inside a transaction (``async with conn.transaction()``, or any
    statement of a non-autocommit connection): the row lock it takes is what makes
    the check hold until commit.
    """
    if conn.autocommit and conn.info.transaction_status != TransactionStatus.INTRANS:
        raise RuntimeError(
            "check_epoch must run inside a transaction (async with conn.transaction())"
        )
    cur = await conn.execute(_FENCE, [election])
    row = await cur.fetchone()
    current = None if row is None else int(row[0])  # type: ignore[index]
    if current != epoch:
        raise Fenced(election, epoch, current)


@contextmanager
def fenced_statement(election: str, epoch: int) -> Iterator[None]:
    """Around a statement that calls ``pgleader.check_epoch(election, epoch)``:
    its fencing error (SQLSTATE PGL01) comes out as `Fenced`; other errors pass."""
    try:
        yield
    except psycopg.Error as exc:
        if exc.sqlstate != FENCED_SQLSTATE:
            raise
        detail = exc.diag.message_detail
        current = int(detail) if detail and detail.isdigit() else None
        raise Fenced(election, epoch, current) from None
