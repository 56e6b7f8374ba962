"""The rewind guard's check (service/watermark.py) while webhooks go on being answered.

Right after a failover an instance answers webhooks from its pool while its election
session checks the database: the mark moves on during the check's queries. Found on a
synchronous failover under load (tests/gateway/test_db_failover.py): the check looked
up one signal and compared it with the next one's fingerprint, found it "missing" and
halted trading on a database that had lost nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.queries import QUERIES
from service.watermark import Watermark


class _AnsweredMeanwhile:
    """A connection on which, while the check's signal lookup is on its way, the
    instance answers another signal (as its webhooks do, on their own connections)."""

    def __init__(self, conn: Any, watermark: Watermark, signal_id: int, fingerprint: str) -> None:
        self.conn, self.watermark = conn, watermark
        self.next = (signal_id, fingerprint)
        self.answered = False

    async def execute(self, query: Any, params: Any = None) -> Any:
        cur = await self.conn.execute(query, params)
        if query is QUERIES["watermark_signal_seen"] and not self.answered:
            self.answered = True
            self.watermark.answered(*self.next)
        return cur


async def test_a_signal_answered_during_the_check_is_no_rewind(db, tmp_path: Path):
    cur = await db.execute(
        "insert into gateway.signals (fingerprint, type, instrument, position, lots, price,"
        " signal_at, payload, received_by)"
        " select md5(random()::text), 'BASE_ENTRY', 'NIFTY', 'Long_' || g, 1, 100, now(), '{}',"
        " 'gw1' from generate_series(1, 2) g returning id, fingerprint"
    )
    (first, first_fp), (second, second_fp) = await cur.fetchall()
    mark = Watermark(tmp_path / "watermark" / "gw1.json", "gateway", "gw1")
    assert await mark.check(db) is None  # this database is the one
    mark.answered(first, first_fp)

    racing = _AnsweredMeanwhile(db, mark, second, second_fp)
    assert await mark.check(racing) is None
    assert racing.answered and mark.mark.signal_id == second
    assert await mark.check(db) is None  # and the next check looks for the second one
    cur = await db.execute("select mode from gateway.trading_halt")
    assert await cur.fetchone() == ("running",)
