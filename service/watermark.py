"""The rewind guard: what this instance saw of the database, kept to check that a
database it reaches again still has it.

A PostgreSQL failover to a standby that replicated asynchronously can lose the
last commits: an epoch bump (a new leader then hands the same epoch number out
again, and two leaders pass the fence) or inbox rows already answered 2xx (a
signal lost). Numbers cannot tell: a re-issued epoch has the same number, and a
sequence jumps past lost ids. So the watermark keeps what identifies them:

- the highest epoch seen, with its leader: this instance's own elections and the
  leader every sweep reads (pgleader.election);
- the newest signal this instance answered 2xx from the inbox, with its
  fingerprint.

`check` runs on the election session after every (re)connection, before the
instance campaigns (the elector's on_connect). The database must still hold the
history row of that epoch with the same leader, and that signal with the same
fingerprint (unless retention may have deleted it). If not, it went back in time:
the kill switch goes to 'rewound' (nothing is sent, by any instance, until an
operator reconciles with the broker and runs `pgleader resume --after-rewind`;
a plain resume leaves it), which raises a `database_rewound` alert.

The watermark lives in memory (always the newest) and in DATA_DIR/watermark/
<instance>.json, written at most once a second when it changed (a restarted
instance starts from what it knew). It belongs to one database (its name and when
pgleader's schema was installed there: a promoted standby or a restored backup is
the same database, a new one is not, and starts a new watermark).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from psycopg import AsyncConnection

from service.queries import QUERIES

__all__ = ["Mark", "Watermark"]

log = structlog.get_logger("pgleader.gateway")

_DATABASE = QUERIES["watermark_database"]
_EPOCH_SEEN = QUERIES["watermark_epoch_seen"]
_SIGNAL_SEEN = QUERIES["watermark_signal_seen"]
_SET_HALT = QUERIES["set_trading_halt"]


@dataclass
class Mark:
    database: str | None = None  # which database the rest was seen in
    epoch: int | None = None
    leader: str | None = None
    acquired_at: str | None = None  # the term's start, ISO 8601 (once a sweep read it)
    signal_id: int | None = None
    fingerprint: str | None = None
    received_at: str | None = None  # ISO 8601, UTC


class Watermark:
    def __init__(
        self, path: Path, election: str, instance_id: str, retention_days: int = 0
    ) -> None:
        self.path, self.election, self.instance_id = path, election, instance_id
        self.retention_days = retention_days
        self.mark = self._load()
        self._dirty = False
        self.rewound: str | None = None  # why, once found (until the process ends)

    def _load(self) -> Mark:
        with contextlib.suppress(OSError, ValueError, TypeError):
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                return Mark(**{k: data.get(k) for k in Mark.__dataclass_fields__})
        return Mark()

    def saw_epoch(
        self, epoch: int | None, leader: str | None, acquired_at: datetime | None = None
    ) -> None:
        if epoch is None or leader is None:
            return
        started = acquired_at.isoformat() if acquired_at is not None else None
        m = self.mark
        if m.epoch is None or epoch > m.epoch:
            m.epoch, m.leader, m.acquired_at = epoch, leader, started
            self._dirty = True
        elif (epoch, leader) == (m.epoch, m.leader) and m.acquired_at is None and started:
            m.acquired_at = started  # its own election, the term's start read since
            self._dirty = True

    def answered(self, signal_id: int, fingerprint: str) -> None:
        self.mark.signal_id, self.mark.fingerprint = signal_id, fingerprint
        self.mark.received_at = datetime.now(UTC).isoformat()
        self._dirty = True

    def save(self) -> None:
        """Write the mark if it changed: a new file, fsynced, renamed over the old."""
        if not self._dirty:
            return
        self._dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self.mark), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    async def check(self, conn: AsyncConnection[Any]) -> str | None:
        """Why the database `conn` reaches went back in time, or None; when it did,
        the kill switch is set to 'rewound' there (which alerts)."""
        why = await self._missing(conn)
        if why is None:
            return None
        self.rewound = why
        log.critical("database went back in time: trading halted", reason=why)
        await conn.execute(_SET_HALT, ["rewound", why, self.instance_id])
        return why

    async def _missing(self, conn: AsyncConnection[Any]) -> str | None:
        cur = await conn.execute(_DATABASE)
        row = await cur.fetchone()
        database = str(row[0]) if row else None
        if self.mark.database != database:
            if self.mark.database is not None:
                log.warning("watermark of another database: starting afresh",
                            was=self.mark.database, now=database)  # fmt: skip
            self.mark = Mark(database=database)
            self._dirty = True
            return None
        # A copy: webhooks answered while these queries are on their way move the mark
        # on, and a signal id checked against the next one's fingerprint is "missing".
        m = replace(self.mark)
        if m.epoch is not None and m.leader is not None:
            cur = await conn.execute(_EPOCH_SEEN, {
                "election": self.election, "epoch": m.epoch, "leader": m.leader,
                "acquired_at": m.acquired_at,
            })  # fmt: skip
            row = await cur.fetchone()
            if not (row and row[0]):
                return (
                    f"the database lacks epoch {m.epoch} of {m.leader}"
                    f"{f' begun {m.acquired_at}' if m.acquired_at else ''}, which instance"
                    f" {self.instance_id} saw (a failover lost commits?)"
                )
        if m.signal_id is not None and m.fingerprint is not None and not self._may_be_deleted():
            cur = await conn.execute(_SIGNAL_SEEN, [m.signal_id])
            row = await cur.fetchone()
            if row is None or row[0] != m.fingerprint:
                return (
                    f"the database lacks signal {m.signal_id}, which instance"
                    f" {self.instance_id} answered as stored (a failover lost commits?)"
                )
        return None

    def _may_be_deleted(self) -> bool:
        """Retention may have deleted the signal: too old to tell."""
        if self.retention_days <= 0 or self.mark.received_at is None:
            return False
        try:
            at = datetime.fromisoformat(self.mark.received_at)
        except ValueError:
            return True
        return datetime.now(UTC) - at > timedelta(days=self.retention_days) - timedelta(hours=1)
