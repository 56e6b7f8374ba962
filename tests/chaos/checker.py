"""Reads a campaign's history and database and names every broken promise.

Invariants:
  once        no signal reached the broker more than once
  no-loss     every signal answered 2xx is executed, or in an explicit terminal
              state (rejected, expired, in_doubt) with an alert recorded; a
              `202 spooled` answer counts like any other (a 503 promises nothing),
              so a signal spooled on a full disk and then lost is named here
  fenced      no order was claimed under an epoch older than the newest epoch
              at the moment its claim committed (commit timestamps)
  epochs      epochs strictly increase and leadership intervals never overlap
              by the database clock
  spool       every instance's spool is empty at the end (the small disk's too)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from tests.chaos.harness import DISK_FULL_NODE, answer_of

if TYPE_CHECKING:
    from tests.chaos.harness import Campaign

INVARIANTS = ["once", "no-loss", "fenced", "epochs", "spool", "soak"]
# A gateway holds its pool (max 10), the election session, the listener, and briefly a
# side session (blocker termination). More than that is a leak.
MAX_SESSIONS = 13
MAX_RSS_MB = 150
TERMINAL_WITH_ALERT = ("rejected", "expired", "in_doubt")


async def _rows(conn: psycopg.AsyncConnection[Any], sql: str) -> list[tuple[Any, ...]]:
    cur = await conn.execute(sql)
    return await cur.fetchall()


def _spool_dirs(c: Campaign) -> set[Path]:
    return {node.data_dir / "spool" for node in c.nodes.values()}


def _spooled(c: Campaign, under: str = "") -> int:
    """Lines in the spool files (`under="quarantine"`: the quarantined ones)."""
    return sum(
        1
        for d in _spool_dirs(c)
        for f in (d / under).glob("*.jsonl")
        for line in _read(f).splitlines()
        if line.strip()
    )


def _read(path: Path) -> bytes:
    """A spool file's bytes; none once a replay removed it between listing and reading."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _traces(c: Campaign, fingerprint: str, instance: str) -> str:
    """For a lost signal: the spool files (or quarantine) that still hold its fingerprint,
    and the answering instance's log lines that name it."""
    found = [
        str(f)
        for d in _spool_dirs(c)
        if d.is_dir()
        for f in sorted(d.rglob("*"))
        if f.is_file() and fingerprint.encode() in _read(f)
    ]
    where = f"; its fingerprint is in {', '.join(found)}" if found else "; on no spool file"
    node = c.nodes.get(instance)
    lines = []
    with contextlib.suppress(OSError):
        if node is not None:
            lines = [line for line in node.log_path.read_text().splitlines() if fingerprint in line]
    return where + "".join(f"\n      {instance} log: {line}" for line in lines[:5])


def _disk_full(c: Campaign, lost: set[str]) -> dict[str, Any]:
    """What the small-disk instance answered during disk_full faults: while its disk
    was full, and once freed (both inside the database outage). By the time of the
    answer, which is when the instance tried its spool."""
    phases: dict[str, Counter[str]] = {"full": Counter(), "freed": Counter()}
    for r in c.history.requests:
        if r.instance != DISK_FULL_NODE:
            continue
        for _, filled, freed, back in c.history.disk_full:
            if filled <= r.answered_at < freed:
                phase = phases["full"]
            elif freed <= r.answered_at < back:
                phase = phases["freed"]
            else:
                continue
            phase[answer_of(r)] += 1
            if r.fingerprint in lost:
                phase["lost"] += 1
    return {
        "faults": len(c.history.disk_full),
        "mode": c.disk.mode if c.disk else None,
        **{k: dict(v) for k, v in phases.items()},
    }


WARM_UP_S = 5.0  # a process still importing its modules is not a baseline


def _soak(c: Campaign) -> dict[str, Any]:
    """RSS first/last/max of each instance's longest-lived process once warmed up,
    and the most sessions any instance held at once."""
    born: dict[tuple[str, int], float] = {}
    by_pid: dict[tuple[str, int], list[int]] = {}
    for at, name, pid, rss, _ in c.history.samples:
        start = born.setdefault((name, pid), at)
        if at - start >= WARM_UP_S:
            by_pid.setdefault((name, pid), []).append(rss)
    rss_mb: dict[str, tuple[int, int, int]] = {}
    for name in sorted({name for name, _ in by_pid}):
        longest = max((v for (n, _), v in by_pid.items() if n == name), key=len)
        rss_mb[name] = (longest[0] // 1024, longest[-1] // 1024, max(longest) // 1024)
    sessions = [s[4] for s in c.history.samples]
    return {"rss_mb": rss_mb, "max_sessions": max(sessions, default=0), "samples": len(sessions)}


async def settle(c: Campaign, conn: psycopg.AsyncConnection[Any], quiet: float) -> None:
    """Wait until nothing is pending, executing or spooled (bounded by `quiet` seconds)."""
    deadline = time.monotonic() + quiet
    while time.monotonic() < deadline:
        (busy,) = (
            await _rows(
                conn,
                "select count(*) from gateway.signals where status in ('pending', 'executing')",
            )
        )[0]
        if busy == 0 and _spooled(c) == 0:
            return
        await asyncio.sleep(0.2)


async def check(c: Campaign, quiet: float) -> dict[str, Any]:
    violations: list[str] = []
    async with await psycopg.AsyncConnection.connect(c.server.dsn, autocommit=True) as conn:
        await settle(c, conn, quiet)
        signals = {
            fp: (sid, status)
            for sid, fp, status in await _rows(
                conn, "select id, fingerprint, status from gateway.signals"
            )
        }
        alerted = {
            sid
            for (sid,) in await _rows(
                conn, "select signal_id from gateway.alerts where signal_id is not null"
            )
        }

        # once: count what the broker itself recorded, per signal
        for sid, count in await _rows(
            conn,
            "select o.signal_id, count(p.id) from gateway.orders o"
            " join gateway.paper_broker_requests p on p.client_order_id = o.client_order_id"
            " group by o.signal_id having count(p.id) > 1",
        ):
            violations.append(f"once: signal {sid} reached the broker {count} times")
        for coid, count in await _rows(
            conn,
            "select client_order_id, count(*) from gateway.paper_broker_requests"
            " group by 1 having count(*) > 1",
        ):
            violations.append(f"once: client order id {coid} received {count} times")

        # no-loss
        accepted = [r for r in c.history.requests if r.status is not None and 200 <= r.status < 300]
        executed = terminal = 0
        lost: set[str] = set()
        for r in accepted:
            found = signals.get(r.fingerprint)
            if found is None:
                lost.add(r.fingerprint)
                violations.append(
                    f"no-loss: {r.fingerprint} answered {r.status} {r.body} by {r.instance}"
                    f" (sent at +{r.sent_at - c.history.started:.2f} s) is not in the inbox"
                    + _traces(c, r.fingerprint, r.instance)
                )
                continue
            sid, status = found
            if status == "executed":
                executed += 1
            elif status in TERMINAL_WITH_ALERT and sid in alerted:
                terminal += 1
            else:
                violations.append(
                    f"no-loss: signal {sid} answered {r.status} ended {status!r} without an alert"
                )

        # fenced: the epoch current when each claim committed
        for order_id, sid, epoch, newest in await _rows(
            conn,
            """
            select o.id, o.signal_id, o.epoch,
                   (select max(h.epoch) from pgleader.leadership_history h
                     where h.election = 'gateway'
                       and pg_xact_commit_timestamp((h.acquired_txid % 4294967296)::text::xid)
                           < pg_xact_commit_timestamp((o.claim_txid % 4294967296)::text::xid))
              from gateway.orders o
            """,
        ):
            if newest is not None and epoch < newest:
                violations.append(
                    f"fenced: order {order_id} of signal {sid} claimed under epoch {epoch} after epoch {newest} was current"
                )

        # epochs
        history = await _rows(
            conn,
            "select epoch, acquired_at, released_at, release_reason from pgleader.leadership_history"
            " where election = 'gateway' order by epoch",
        )
        for before, after in itertools.pairwise(history):
            if after[0] <= before[0] or after[1] <= before[1]:
                violations.append(f"epochs: epoch {after[0]} does not follow {before[0]}")
            if before[2] is None or before[2] > after[1]:
                violations.append(
                    f"epochs: epoch {before[0]} (released {before[2]}) overlaps epoch {after[0]} (acquired {after[1]})"
                )

        soak = _soak(c)
        if soak["max_sessions"] > MAX_SESSIONS:
            violations.append(
                f"soak: an instance held {soak['max_sessions']} sessions: {c.history.session_peak}"
            )
        for name, (first, last, peak) in soak["rss_mb"].items():
            if peak > MAX_RSS_MB or last > first * 1.5 + 10:
                violations.append(f"soak: {name} RSS grew {first} -> {last} MB (max {peak})")

        spooled = _spooled(c)
        if spooled:
            violations.append(f"spool: {spooled} signals still spooled")
        (broker_requests,) = (
            await _rows(conn, "select count(*) from gateway.paper_broker_requests")
        )[0]

    return {
        "seed": c.seed,
        "requests": len(c.history.requests),
        "accepted": len(accepted),
        "unanswered": sum(r.status is None for r in c.history.requests),
        "answers": dict(Counter(answer_of(r) for r in c.history.requests if r.status)),
        "spooled_answers": sum(answer_of(r) == "202 spooled" for r in accepted),
        # a line cut short by a kill mid-append (never answered): kept, not a loss
        "quarantined": _spooled(c, "quarantine"),
        "disk_full": _disk_full(c, lost),
        "executed": executed,
        "terminal": terminal,
        "epochs": len(history),
        "inbox": len(signals),
        "broker_requests": broker_requests,
        "faults": c.history.faults,
        "invariants": INVARIANTS,
        "soak": soak,
        "violations": violations,
    }
