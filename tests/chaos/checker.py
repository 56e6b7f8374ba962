"""Reads a campaign's history, database and broker book, and names every broken promise.

Invariants:
  once        each signal executed at most once: at most one of its orders ended
              filled or matched (the ledger moved once)
  no-loss     every signal answered 2xx (counted once per fingerprint: TradingView's
              re-sends carry the same body) is executed, or in an explicit terminal
              state (rejected, expired, failed, in_doubt) with an alert recorded; a
              `202 spooled` answer counts like any other (a 503 promises nothing),
              so a signal spooled on a full disk and then lost is named here
  fenced      no order was claimed under an epoch older than the newest epoch
              at the moment its claim committed (commit timestamps)
  epochs      epochs strictly increase and leadership intervals never overlap
              by the database clock
  spool       every instance's spool is empty at the end (the small disk's too)
  soak        no instance's sessions or memory grew without bound
  broker      the broker's book against the ledger, per instrument of the
              instruments file (`broker_promise`; units are lots x lot size,
              negative for short; a future with a contract rule is the sum
              over its contracts, its |position| the sum of theirs):
    position    at the end, the broker's net position equals the ledger's open
                net position (gateway.positions open lots x lot size, signed by
                side). An instrument with a signal in_doubt may differ: it is
                then reported (`in_doubt`), never counted as matched; an
                in_doubt signal without an alert is a violation whatever else.
    exposure    the largest |position| the broker ever held is at most the
                largest |target| of the orders that moved the ledger (the
                filled or matched order of each executed signal) and of every
                order of an in_doubt signal: no fault made the broker hold more
                than some signal asked for.
    landing     every fill leaves the broker at the target of an order the
                gateway booked for that instrument (any outcome: it may have
                been sent), and a fill whose broker order id the ledger
                recorded leaves it at that order's target. A target order sent
                again after settling (the first try was refused, or got 5xx
                before it was applied) is no duplicate: the broker sees the
                same target twice and moves once. A duplicate that doubled the
                exposure (a delta sent twice, a plain order of the quantity)
                would land on a position no order targeted.
    fills       the broker has no more fills of an instrument than the gateway
                booked orders for it (one placesmartorder per order, never
                retried by the adapter).
  no-lead     the instance started with --no-lead never appears in the leadership
              history, never claimed a signal and never booked an order
              (`no_lead_promise`); it answers webhooks like the others
  transfer    each switchover the campaign asked for (`transfer_promise`):
    live        to a live eligible follower: accepted, and the next instance
                elected is that follower (within a generous bound)
    dead        to a follower killed just before: refused with a one-line
                reason and the leadership unchanged, or, while the registry
                still showed it alive, accepted, and then another instance
                elected (once the bound, 2 x evict_after, is over): never
                leaderless for good, and never the killed target elected (a
                session of it outliving its process)
    ineligible  to the --no-lead instance: refused with a one-line reason,
                the leadership unchanged
  waiter      after each pause_waiter (the leader SIGKILLed while the follower first
              in the lock's queue is paused): another instance is elected while it
              stays paused, even when the server granted its session the lock
              (`waiter_promise`; reported: pause -> elected)
  failover    after each db_failover (the primary crashed, its synchronous standby
              promoted) an instance is elected on the promoted node; the other
              invariants hold across it (nothing acknowledged is lost: once,
              no-loss, epochs). Reported: promotion -> elected, -> first signal
              executed, the new standby's rebuild (`failover_figures`)
  redis       Redis decides nothing: killed, paused or holding wrong entries
              (fingerprints of signals never stored, answered `200 duplicate` in
              an outage), the invariants above hold; reported: how many such
              duplicates were answered, each kept and executed (no-loss)
  rollover    each futures roll (gateway.rollovers, `rollover_promise`):
    done        no roll is left active after the quiet period, and once rolled
                the broker holds nothing of the contract it left (no double
                exposure; the exposure rule above bounds it while it rolls)
    orders      at most one exit fill at the broker in the contract it left and
                one entry fill in the next, and no more than it booked: a fill
                is the roll's when its broker order id is one of the roll's
                orders, or no signal order's and stamped (the fake's whole
                seconds) from the roll's start to its end
    waits       no signal order of its instrument was claimed while the roll was
                active (the claim's commit between the roll's created_at and
                its finish's commit: one clock, the database's); those claimed
                after it trade the next contract
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from zoneinfo import ZoneInfo

import psycopg

from tests.chaos.broker import Traded
from tests.chaos.harness import (
    DISK_FULL_NODE,
    NO_LEAD_NODE,
    REDIS_FAULTS,
    Failover,
    PausedWaiter,
    Request,
    Transfer,
    answer_of,
)

if TYPE_CHECKING:
    from tests.chaos.harness import Campaign

INVARIANTS = [
    "once", "no-loss", "fenced", "epochs", "spool", "soak", "broker", "rollover", "no-lead",
    "transfer", "waiter", "failover", "redis",
]  # fmt: skip
# A gateway holds its pool (max 10), the election session, the listener, and briefly a
# side session (blocker termination). More than that is a leak.
MAX_SESSIONS = 13
MAX_RSS_MB = 150
TERMINAL_WITH_ALERT = ("rejected", "expired", "failed", "in_doubt")
MOVED_THE_LEDGER = ("filled", "matched")
FAKE_TIME = ZoneInfo("Asia/Kolkata")  # the fake OpenAlgo's order stamps
# How long after its claim an order may still land at the fake (a paused or slow fake).
_LATE_FILL = timedelta(seconds=30)


class SignalRow(NamedTuple):
    instrument: str
    status: str
    detail: str | None
    received_at: datetime | None = None


class OrderRow(NamedTuple):
    signal_id: int | None  # None: a roll's order
    client_order_id: str
    outcome: str
    broker_order_id: str | None
    start: int | None
    target: int | None
    instrument: str | None = None  # else its signal's
    symbol: str | None = None  # a future's contract, exchange:symbol:product
    rollover_id: int | None = None
    claimed: datetime | None = None  # when the transaction that booked it committed


class RollRow(NamedTuple):
    id: int
    instrument: str
    from_contract: str  # exchange:symbol:product
    to_contract: str
    side: str
    lots: int
    state: str
    detail: str | None
    created_at: datetime
    finished_at: datetime | None  # when its finish committed; None while active


async def _rows(
    conn: psycopg.AsyncConnection[Any],
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
) -> list[tuple[Any, ...]]:
    cur = await conn.execute(sql, params)
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
    """Wait until nothing is pending, executing, rolling or spooled (bounded by `quiet`
    seconds)."""
    deadline = time.monotonic() + quiet
    while time.monotonic() < deadline:
        (busy,) = (
            await _rows(
                conn,
                "select (select count(*) from gateway.signals"
                "         where status in ('pending', 'executing'))"
                "     + (select count(*) from gateway.rollovers"
                "         where state in ('due', 'exiting', 'entering'))",
            )
        )[0]
        if busy == 0 and _spooled(c) == 0:
            return
        await asyncio.sleep(0.2)


def broker_promise(
    instruments: Mapping[str, Traded],
    signals: Mapping[int, SignalRow],
    orders: Sequence[OrderRow],
    open_positions: Sequence[tuple[str, str, int]],
    alerted: set[int],
    book: Mapping[str, Any],
) -> dict[str, Any]:
    """The broker invariants (see the module's docstring) of one campaign's end state.

    `orders` in the order they were booked; `open_positions` the ledger's open rows
    (instrument, side, lots); `book` the fake OpenAlgo's /_fake/state, whose orders
    are its fills in the order it made them. Returns the violations, a row per
    instrument and every in_doubt signal."""
    violations: list[str] = []
    by_key = {key: i for i in instruments.values() for key in i.keys}
    ledger: Counter[str] = Counter()
    for name, side, lots in open_positions:
        unit = instruments[name].lot_size if name in instruments else 1
        ledger[name] += (-1 if side == "short" else 1) * int(lots) * unit
    held = {
        (p["symbol"], p["exchange"], p["product"]): int(p["quantity"]) for p in book["positions"]
    }
    in_doubt = sorted(
        (sid, row.instrument, sid in alerted, row.detail or "")
        for sid, row in signals.items()
        if row.status == "in_doubt"
    )
    for sid, name, has_alert, detail in in_doubt:
        if not has_alert:
            violations.append(f"broker: signal {sid} of {name} in_doubt without an alert: {detail}")
    doubtful = {name for _, name, _, _ in in_doubt}

    booked: dict[str, list[OrderRow]] = {name: [] for name in instruments}
    for o in orders:
        if (of := _of(signals, o)) in booked:
            booked[of].append(o)
    fills: dict[str, list[dict[str, Any]]] = {name: [] for name in instruments}
    for fill in book["orders"]:
        if fill.get("status", "complete") != "complete":
            continue  # rejected after its orderid, or still open: nothing moved
        traded = by_key.get((fill["symbol"], fill["exchange"], fill["product"]))
        if traded is None:
            violations.append(f"broker: a fill of {fill['symbol']}, which no instrument trades")
            continue
        fills[traded.name].append(fill)
    unknown = set(held) - set(by_key)
    for key in sorted(unknown):
        if held[key]:
            violations.append(
                f"broker: holds {held[key]} of {':'.join(key)}, no instrument of ours"
            )

    rows: dict[str, dict[str, Any]] = {}
    for name, traded in instruments.items():
        mine = booked[name]
        status_of = {o.client_order_id: _status(signals, o) for o in mine}
        # A roll's target is the position the ledger held (its entry) or flat (its exit).
        counted = [
            o.target
            for o in mine
            if o.target is not None
            and (
                (status_of[o.client_order_id] == "executed" and o.outcome in MOVED_THE_LEDGER)
                or status_of[o.client_order_id] == "in_doubt"
                or o.rollover_id is not None
            )
        ]
        bound = max((abs(t) for t in counted), default=0)
        targets = {o.target for o in mine if o.target is not None}
        by_broker_id = {o.broker_order_id: o for o in mine if o.broker_order_id}
        position = lowest = highest = gross = 0
        contracts: Counter[str] = Counter()  # a future's position in each contract
        for fill in fills[name]:
            signed = (1 if fill["action"] == "BUY" else -1) * int(fill["quantity"])
            position += signed
            contracts[fill["symbol"]] += signed
            lowest, highest = min(lowest, position), max(highest, position)
            gross = max(gross, sum(abs(n) for n in contracts.values()))
            if position not in targets:
                violations.append(
                    f"broker: landing: fill {fill['orderid']} ({fill['action']} {fill['quantity']})"
                    f" left {name} at {position}, which no order of it targeted"
                    f" (targets {sorted(targets)}): a duplicate or a stale order"
                )
            ours = by_broker_id.get(fill["orderid"])
            if ours is not None and ours.target != position:
                violations.append(
                    f"broker: landing: fill {fill['orderid']} left {name} at {position}, its"
                    f" order {ours.client_order_id} targeted {ours.target}"
                )
        broker_now = sum(held.get(key, 0) for key in traded.keys)
        if broker_now != position:
            violations.append(f"broker: {name} holds {broker_now}, its fills add up to {position}")
        max_abs = max(
            [gross] + [int(book["max_abs_positions"].get(s, 0)) for s in traded.contracts]
        )
        if max_abs > bound:
            violations.append(
                f"broker: exposure: {name} reached |{max_abs}| at the broker, the executed"
                f" and in_doubt signals (and rolls) allowed |{bound}| at most"
            )
        if len(fills[name]) > len(mine):
            violations.append(
                f"broker: fills: {len(fills[name])} fills of {name}, {len(mine)} orders booked"
            )
        matched = broker_now == ledger[name]
        if not matched and name not in doubtful:
            violations.append(
                f"broker: position: {name} the broker holds {broker_now}, the ledger"
                f" {ledger[name]}, and no signal of it is in_doubt"
            )
        rows[name] = {
            "ledger": ledger[name],
            "broker": broker_now,
            "position": (
                "matched" if matched else "differs, in_doubt" if name in doubtful else "DIFFERS"
            ),
            "max_abs": max_abs,
            "bound": bound,
            "fills": len(fills[name]),
            "orders": len(mine),
            "in_doubt": sum(n == name for _, n, _, _ in in_doubt),
            "long_short": (highest > 0, lowest < 0),
        }
    return {
        "violations": violations,
        "instruments": rows,
        "in_doubt": in_doubt,
        "fills": sum(len(f) for f in fills.values()),
        "both_ways": sum(r["long_short"] == (True, True) for r in rows.values()),
        "answers": dict(book.get("answers", {})),
    }


def rollover_promise(
    signals: Mapping[int, SignalRow],
    orders: Sequence[OrderRow],
    rolls: Sequence[RollRow],
    book: Mapping[str, Any],
) -> dict[str, Any]:
    """The rollover invariants (see the module's docstring) of one campaign's end
    state: the violations, and a row per roll (its orders, booked and filled; how
    many signals waited behind it)."""
    violations: list[str] = []
    held = {
        (p["symbol"], p["exchange"], p["product"]): int(p["quantity"]) for p in book["positions"]
    }
    by_signals = {o.broker_order_id for o in orders if o.rollover_id is None and o.broker_order_id}
    rows = []
    for r in rolls:
        name = r.instrument
        until = r.finished_at or datetime.max.replace(tzinfo=UTC)
        since = r.created_at.replace(microsecond=0)  # the fake stamps whole seconds
        steps: dict[str, dict[str, Any]] = {}
        for step, where in (("exit", r.from_contract), ("entry", r.to_contract)):
            booked = [o for o in orders if o.rollover_id == r.id and o.symbol == where]
            ours = {o.broker_order_id for o in booked if o.broker_order_id}
            fills = [
                f
                for f in book["orders"]
                if (f["symbol"], f["exchange"], f["product"]) == _place(where)
                and (
                    f["orderid"] in ours
                    or (f["orderid"] not in by_signals and since <= _stamp(f) <= until)
                )
            ]
            # A signal order of this contract whose answer was lost (settled at the
            # target, or unknown) has no broker id on record: a fill of no known order
            # stamped in the roll's window may be its, not the roll's, when it was
            # claimed close enough (the fake stamps whole seconds).
            unidentified = [
                o
                for o in orders
                if o.rollover_id is None and o.symbol == where and not o.broker_order_id
                and o.outcome in ("filled", "unknown") and o.claimed is not None
                and since - _LATE_FILL <= o.claimed <= until + timedelta(seconds=1)
            ]  # fmt: skip
            anonymous = sum(f["orderid"] not in ours for f in fills)
            theirs = len(fills) - anonymous + max(0, anonymous - len(unidentified))
            steps[step] = {
                "booked": dict(Counter(o.outcome for o in booked)),
                "fills": theirs,
            }
            if theirs > min(1, len(booked)):
                listed = ", ".join(
                    f"{f['orderid']} {f['action']} {f['quantity']} at {f['timestamp']}"
                    for f in fills
                )
                violations.append(
                    f"rollover: roll {r.id} of {name} placed {theirs} {step} orders at the"
                    f" broker in {where}, {len(booked)} booked ({listed}; signal orders there"
                    f" with no broker id: {len(unidentified)})"
                )
        if r.finished_at is None:
            violations.append(
                f"rollover: roll {r.id} of {name} is still {r.state!r} after the quiet period:"
                f" {r.detail or 'no detail'}"
            )
        elif left := held.get(_place(r.from_contract), 0):
            violations.append(
                f"rollover: roll {r.id} of {name} rolled, yet the broker still holds {left} of"
                f" {r.from_contract}"
            )
        theirs = [o for o in orders if o.rollover_id is None and _of(signals, o) == name]
        during = [o for o in theirs if o.claimed and r.created_at <= o.claimed <= until]
        violations += [
            f"rollover: signal {o.signal_id} of {name} claimed at {o.claimed:%H:%M:%S.%f}"
            f" while roll {r.id} was active ({r.created_at:%H:%M:%S.%f} to"
            f" {r.finished_at and f'{r.finished_at:%H:%M:%S.%f}'})"
            for o in during
        ]
        after = [o for o in theirs if o.claimed and o.claimed > until]
        violations += [
            f"rollover: signal {o.signal_id} of {name} claimed after roll {r.id} traded"
            f" {o.symbol}, not {r.to_contract}"
            for o in after
            if o.symbol != r.to_contract
        ]
        waited = {
            o.signal_id
            for o in after
            if o.signal_id in signals
            and (received := signals[o.signal_id].received_at) is not None
            and received < until
        }
        took = (r.finished_at - r.created_at).total_seconds() if r.finished_at else None
        rows.append(
            {
                "id": r.id,
                "instrument": name,
                "from": r.from_contract,
                "to": r.to_contract,
                "side": r.side,
                "lots": r.lots,
                "state": r.state,
                "seconds": took,
                **steps,
                "waited": len(waited),
                "claimed_during": len(during),
            }
        )
    return {
        "violations": violations,
        "rolls": rows,
        "states": dict(Counter(r.state for r in rolls)),
    }


def no_lead_promise(instance: str, led: Sequence[int], claimed: int, ordered: int) -> list[str]:
    """The no-lead invariant: the epochs `instance` led (none allowed), the signals it
    claimed and the orders it booked (none allowed)."""
    violations = []
    if led:
        violations.append(
            f"no-lead: {instance} runs with --no-lead, yet led epoch(s)"
            f" {', '.join(map(str, led))} (pgleader.leadership_history)"
        )
    if claimed or ordered:
        violations.append(
            f"no-lead: {instance} runs with --no-lead, yet claimed {claimed} signal(s)"
            f" and booked {ordered} order(s)"
        )
    return violations


def transfer_promise(transfers: Sequence[Transfer]) -> list[str]:
    """The transfer invariants (see the module's docstring) of the campaign's switchovers."""
    violations = []
    for t in transfers:
        name = f"transfer: {t.kind} {t.leader} -> {t.to} via {t.via} (epoch {t.epoch})"
        refused = t.answer == "refused"
        if refused and (not t.said.strip() or "\n" in t.said.strip()):
            violations.append(f"{name}: refused, but not in one line: {t.said!r}")
        if refused and t.after != (t.epoch, t.leader):
            got = f"epoch {t.after[0]} led by {t.after[1]}" if t.after else "unknown"
            violations.append(f"{name}: refused, yet the leadership changed: {got}")
        first = t.elections[0][0] if t.elections else None
        if t.kind == "transfer_live":
            if t.answer != "accepted":
                violations.append(f"{name}: a live follower, answered {t.answer}: {t.said}")
            elif first != t.to:
                violations.append(
                    f"{name}: accepted, then {first or 'nobody'} elected"
                    f" (within {t.waited:g} s), not {t.to}"
                )
        elif t.kind == "transfer_ineligible" and not refused:
            violations.append(
                f"{name}: an instance that may not lead, answered {t.answer}: {t.said}"
                f"; then {first or 'nobody'} elected"
            )
        elif t.kind == "transfer_dead" and not refused:
            if t.answer != "accepted":
                violations.append(f"{name}: a killed follower, answered {t.answer}: {t.said}")
            for who, epoch, took in t.elections:
                if who == t.to:
                    violations.append(
                        f"{name}: the killed target was elected (epoch {epoch}, {took:.2f} s"
                        " after the request): a session of it outlived its process"
                    )
            if not t.elections or t.elections[-1][0] == t.to:
                violations.append(
                    f"{name}: accepted for a killed follower, then no other instance elected"
                    f" within {t.waited:g} s: leaderless for good"
                )
    return violations


async def waiter_promise(
    conn: psycopg.AsyncConnection[Any], waits: Sequence[PausedWaiter]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each pause_waiter's elections while the waiter was paused; the violations: none
    of another instance. The paused instance's session, granted the lock, claims for it
    on the server (the wait and the claim are one statement): that epoch may appear,
    led by a frozen process, and another must follow it within the pause. What the
    frozen instance could do on waking is the `fenced` rule's: nothing under that epoch."""
    rows, violations = [], []
    for w in waits:
        elected = await _rows(
            conn,
            "select instance_id, epoch, extract(epoch from acquired_at)::float8"
            "  from pgleader.leadership_history where election = 'gateway'"
            "   and acquired_at between to_timestamp(%s) and to_timestamp(%s)"
            " order by acquired_at, epoch",
            [w.paused_at, w.resumed_at],
        )
        own = next((epoch for name, epoch, _ in elected if name == w.waiter), None)
        other = next((e for e in elected if e[0] != w.waiter), None)
        rows.append({
            "waiter": w.waiter,
            "leader_killed": w.leader,
            "granted_the_lock": w.granted,
            "paused_s": round(w.resumed_at - w.paused_at, 3),
            "paused_instance_epoch": own,
            "elected": other[0] if other else None,
            "pause_to_elected_s": round(other[2] - w.paused_at, 3) if other else None,
        })  # fmt: skip
        what = f"waiter: {w.leader} killed while {w.waiter} was paused waiting on the lock" + (
            " (its session granted the lock)" if w.granted else ""
        )
        if other is None:
            led = f" (the paused instance led epoch {own})" if own is not None else ""
            violations.append(
                f"{what}: no other instance elected in the {w.resumed_at - w.paused_at:.1f} s"
                f" it was paused{led}"
            )
    return rows, violations


async def failover_figures(
    conn: psycopg.AsyncConnection[Any], failovers: Sequence[Failover]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each db_failover's figures, from the first election after its crash (none is
    possible before the promotion: no node accepts writes) and the first signal
    executed after it; and the violations: a failover after which nobody led."""
    rows, violations = [], []
    for f in failovers:
        (before, elected, executed) = (
            await _rows(
                conn,
                "select (select max(epoch) from pgleader.leadership_history"
                "         where election = 'gateway' and acquired_at < to_timestamp(%(t)s)),"
                " (select array[epoch::text, instance_id,"
                "         extract(epoch from acquired_at)::float8::text]"
                "    from pgleader.leadership_history"
                "   where election = 'gateway' and acquired_at >= to_timestamp(%(t)s)"
                "   order by acquired_at, epoch limit 1),"
                " (select extract(epoch from min(finished_at))::float8 from gateway.signals"
                "   where status = 'executed' and finished_at >= to_timestamp(%(p)s))",
                {"t": f.crashed_at, "p": f.promoting_at},
            )
        )[0]
        row = {
            "gap_s": round(f.promoting_at - f.crashed_at, 3),
            "promote_s": round(f.promoted_at - f.promoting_at, 3),
            "epoch_before": before,
            "epoch": int(elected[0]) if elected else None,
            "leader": elected[1] if elected else None,
            # from `pg_ctl promote` asked (the figure tests/gateway/test_db_failover.py prints)
            "promote_to_elected_s": round(float(elected[2]) - f.promoting_at, 3)
            if elected
            else None,
            "promoted_to_elected_s": round(float(elected[2]) - f.promoted_at, 3)
            if elected
            else None,
            "promote_to_first_executed_s": round(executed - f.promoting_at, 3)
            if executed is not None
            else None,
            "rebuilt_s": None if f.rebuilt_s is None else round(f.rebuilt_s, 3),
            "rebuild_error": f.rebuild_error,
        }
        rows.append(row)
        if elected is None:
            violations.append(
                f"failover: the primary :{f.old_port} crashed, :{f.new_port} promoted; nobody"
                " was elected after it"
            )
    return rows, violations


def redis_figures(requests: Sequence[Request], planted: set[str]) -> dict[str, Any]:
    """What Redis's wrong entries changed in the answers: the planted fingerprints
    whose first send was answered `200 duplicate` (the gateway asked Redis, the
    database being down). Whether each was kept and executed is no-loss's."""
    first: dict[str, Request] = {}
    for r in sorted(requests, key=lambda r: r.sent_at):
        first.setdefault(r.fingerprint, r)
    duplicates = sorted(
        fp for fp in planted if fp in first and answer_of(first[fp]) == "200 duplicate"
    )
    return {"planted": len(planted), "answered_duplicate": duplicates}


def _of(signals: Mapping[int, SignalRow], o: OrderRow) -> str | None:
    """The instrument of an order."""
    return o.instrument or (signals[o.signal_id].instrument if o.signal_id in signals else None)


def _status(signals: Mapping[int, SignalRow], o: OrderRow) -> str | None:
    """The status of an order's signal (None: a roll's order)."""
    return signals[o.signal_id].status if o.signal_id in signals else None


def _place(where: str) -> tuple[str, str, str]:
    """A contract as orders record it (exchange:symbol:product), as the fake books it."""
    exchange, symbol, product = where.split(":")
    return symbol, exchange, product


def _stamp(fill: Mapping[str, Any]) -> datetime:
    return datetime.strptime(fill["timestamp"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=FAKE_TIME)


async def _book(c: Campaign, attempts: int = 20) -> dict[str, Any]:
    """The broker's state once its fills stop changing (a late order may still land)."""
    state = await c.broker.state()
    for _ in range(attempts):
        await asyncio.sleep(0.5)
        again = await c.broker.state()
        if len(again["orders"]) == len(state["orders"]):
            return again
        state = again
    return state


async def check(c: Campaign, quiet: float) -> dict[str, Any]:
    violations: list[str] = []
    async with await psycopg.AsyncConnection.connect(c.server.dsn, autocommit=True) as conn:
        await settle(c, conn, quiet)
        rows = await _rows(
            conn,
            "select id, fingerprint, status, instrument, detail, received_at from gateway.signals",
        )
        signals = {fp: (sid, status) for sid, fp, status, *_ in rows}
        by_id = {sid: SignalRow(name, status, *rest) for sid, _, status, name, *rest in rows}
        alerted = {
            sid
            for (sid,) in await _rows(
                conn, "select signal_id from gateway.alerts where signal_id is not null"
            )
        }
        orders = [
            OrderRow(*row)
            for row in await _rows(
                conn,
                "select signal_id, client_order_id, outcome, broker_order_id, start_position,"
                " target_position, instrument, symbol, rollover_id,"
                " pg_xact_commit_timestamp((claim_txid % 4294967296)::text::xid)"
                " from gateway.orders order by id",
            )
        ]
        # A roll's row is last written by its finish (or by its latest step, while active).
        rolls = [
            RollRow(*row)
            for row in await _rows(
                conn,
                "select id, instrument, from_contract, to_contract, side, lots, state, detail,"
                " created_at, case when state = 'rolled' then pg_xact_commit_timestamp(xmin) end"
                " from gateway.rollovers order by id",
            )
        ]
        open_positions = await _rows(
            conn, "select instrument, side, lots from gateway.positions where status = 'open'"
        )

        # once: the ledger moved at most once per signal
        moved = Counter(
            o.signal_id for o in orders if o.signal_id is not None and o.outcome in MOVED_THE_LEDGER
        )
        for sid, count in sorted(moved.items()):
            if count > 1:
                violations.append(f"once: signal {sid} has {count} orders filled or matched")

        # no-loss, once per fingerprint (a re-sent body is the same signal)
        accepted = [r for r in c.history.requests if r.status is not None and 200 <= r.status < 300]
        executed = terminal = 0
        lost: set[str] = set()
        seen: set[str] = set()
        for r in accepted:
            if r.fingerprint in seen:
                continue
            seen.add(r.fingerprint)
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

        # broker: its book against the ledger; rollover: each roll's orders and timing
        book = await _book(c)
        broker = broker_promise(c.instruments, by_id, orders, open_positions, alerted, book)
        violations += broker.pop("violations")
        rollovers = rollover_promise(by_id, orders, rolls, book)
        violations += rollovers.pop("violations")

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

        # no-lead: never in the leadership history, never a claim, never an order
        led = [
            epoch
            for (epoch,) in await _rows(
                conn,
                "select epoch from pgleader.leadership_history where instance_id = %s"
                " order by epoch",
                [NO_LEAD_NODE],
            )
        ]
        ((claimed, ordered, stored, done),) = await _rows(
            conn,
            "select (select count(*) from gateway.signals where claimed_by = %(i)s),"
            " (select count(*) from gateway.orders where instance_id = %(i)s),"
            " (select count(*) from gateway.signals where received_by = %(i)s),"
            " (select count(*) from gateway.signals where received_by = %(i)s"
            "   and status = 'executed')",
            {"i": NO_LEAD_NODE},
        )
        violations += no_lead_promise(NO_LEAD_NODE, led, claimed, ordered)
        to_it = [r for r in c.history.requests if r.instance == NO_LEAD_NODE]
        no_lead = {
            "instance": NO_LEAD_NODE,
            "requests": len(to_it),
            "answered_2xx": sum(r.status is not None and 200 <= r.status < 300 for r in to_it),
            "stored": stored,
            "executed": done,
            "led": led,
            "claimed": claimed,
            "ordered": ordered,
        }
        violations += transfer_promise(c.history.transfers)
        failovers, named = await failover_figures(conn, c.history.failovers)
        violations += named
        paused_waiters, named = await waiter_promise(conn, c.history.paused_waiters)
        violations += named
        redis = redis_figures(c.history.requests, c.history.planted)
        redis["ended"] = dict(
            Counter(signals[fp][1] for fp in redis["answered_duplicate"] if fp in signals)
        )
        redis["faults"] = dict(Counter(k for _, k, _ in c.history.faults if k in REDIS_FAULTS))

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
        statuses = Counter(row.status for row in by_id.values())
        # how orders ended, by outcome and the first words of their detail
        # ("settled", "not placed", "not sent"): the settle path at work
        outcomes = {
            f"{outcome}{' (' + why + ')' if why else ''}": n
            for outcome, why, n in await _rows(
                conn,
                "select outcome, split_part(coalesce(detail, ''), ':', 1), count(*)"
                " from gateway.orders group by 1, 2 order by 3 desc",
            )
        }
        refusals = await _rows(
            conn,
            "select status, regexp_replace(detail, '[0-9]+', 'N', 'g'), count(*)"
            " from gateway.signals where status in ('rejected', 'expired', 'failed')"
            " group by 1, 2 order by 3 desc limit 6",
        )

    return {
        "seed": c.seed,
        "requests": len(c.history.requests),
        "accepted": len(seen),
        "answers_2xx": len(accepted),
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
        "statuses": dict(statuses),
        "orders": len(orders),
        "outcomes": outcomes,
        "refusals": refusals,
        "broker": broker,
        "rollovers": rollovers,
        "moves": dict(c.history.moves),
        "resent": sum(r.resent > 0 for r in c.history.requests),
        "faults": c.history.faults,
        "transfers": [asdict(t) for t in c.history.transfers],
        "failovers": failovers,
        "paused_waiters": paused_waiters,
        "redis": redis,
        "no_lead": no_lead,
        "invariants": INVARIANTS,
        "soak": soak,
        "violations": violations,
    }
