"""The gateway's verbs, plugged into the pgleader CLI by entry point.

`serve` runs one instance. `signals`, `positions` and `alerts` show what the
gateway received, holds and raised, for people (tables on a terminal, else JSON
lines). `sinks` shows what the alert sinks got from the
database, and `sinks test` sends each configured sink a test message. `halt`, `resume` and `reconcile` act through the
database, so they work from any machine that reaches it, whichever instance
leads: the kill switch is a row every claim reads; a reconciliation is a request
the leader runs (it holds the broker session) and this command waits for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from pgleader.cli import (
    add_common,
    add_listing,
    add_timings,
    as_json,
    print_rows,
    require_dsn,
    since_params,
    timings_from,
)
from pgleader.config import Choice, Instant, Number, Text, env_setting, resolve_dsn
from pgleader.connect import connect
from pgleader.errors import ConfigError
from service.config import add_arguments, add_sink_arguments, from_args, sink_settings
from service.execution.reconciliation import as_run
from service.queries import QUERIES

__all__ = ["register"]

SIGNAL_STATUSES = ("pending", "executing", "executed", "failed", "rejected", "expired",
                   "in_doubt", "awaiting_approval")  # fmt: skip


def register(verbs: Any) -> None:
    text = "run one gateway instance (starts an embedded PostgreSQL when no DSN is given)"
    parser: argparse.ArgumentParser = verbs.add_parser("serve", help=text, description=text)
    add_common(parser)
    add_timings(parser)
    add_arguments(parser)
    parser.set_defaults(func=_serve)

    def verb(name: str, func: Any, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = verbs.add_parser(name, help=text, description=text)
        add_common(p)
        p.set_defaults(func=func)
        return p

    p = verb("halt", _halt, "stop trading: no order is sent until `pgleader resume` (stored: it"
             " survives failovers and restarts)")  # fmt: skip
    p.add_argument("--reason", type=Text(500), help="why, for the alert and log (required)")
    p.add_argument(
        "--entries-only", action="store_true", help="stop new risk only: exits still go out"
    )
    p = verb("resume", _resume, "trade again after `pgleader halt`")
    p.add_argument(
        "--after-rewind", action="store_true",
        help="trade again after the database went back in time (a failover lost commits):"
        " only once the broker's positions and the ledger agree (`pgleader reconcile`)",
    )  # fmt: skip
    p.add_argument(
        "--open", type=Choice("end", "requeue"), default=None,
        help="with --after-rewind, for signals the database held from before it went back"
        " in time and still shows open (the lost commits may have executed them): end"
        " (never sent) or requeue (sent as usual); needed only when there are some",
    )  # fmt: skip
    p = verb(
        "reconcile",
        _reconcile,
        "compare the ledger's positions with the broker's now (the leader runs it) and print"
        " the result; exit 1 when anything is not matched",
    )
    p.add_argument(
        "--timeout", type=Number(float, 1, 3600, "s"), default=30.0,
        help="seconds to wait for the leader's result (default 30)",
    )  # fmt: skip
    p = verb("settle", _settle, "settle by hand a signal in doubt or awaiting approval, once"
             " you have read the broker's order book: filled (executed; the ledger moves) or"
             " not filled (failed)")  # fmt: skip
    p.add_argument("signal_id", nargs="?", type=Number(int, 1, 2**63 - 1), metavar="SIGNAL_ID",
                   help="the signal's id (`pgleader signals --status in_doubt`)")  # fmt: skip
    outcome = p.add_mutually_exclusive_group()
    outcome.add_argument("--filled", dest="filled", action="store_true", default=None,
                         help="its order filled at the broker")  # fmt: skip
    outcome.add_argument("--not-filled", dest="filled", action="store_false", default=None,
                         help="it did not (rejected, cancelled, declined, never placed)")  # fmt: skip
    p.add_argument("--reason", type=Text(500), help="what you saw at the broker, for the"
                   " alert and the signal's detail (required)")  # fmt: skip
    verb("stats", _stats, "print the leader's statistics (signals, orders, positions, P&L)")
    p = verb("rollover", _rollover, "show which futures the leader rolls, to what, and when"
             " (the roll itself is the leader's `rollover` job)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="only show (the default and only mode)")
    p.add_argument("--instruments-file", type=Text(), default=None,
                   help="the instruments file (env PGLEADER_INSTRUMENTS_FILE)")  # fmt: skip
    p.add_argument("--at", type=Instant(), default=None,
                   help="as at this ISO time (default now), e.g. 2026-12-24T10:00+05:30")  # fmt: skip
    p.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    p = verb("signals", _signals, "recent signals, newest first, with their orders")
    p.add_argument("--status", type=Choice(*SIGNAL_STATUSES), default=None,
                   help=f"only signals in this status: {', '.join(SIGNAL_STATUSES)}")  # fmt: skip
    add_listing(p, since="signals received", limit=50)
    p = verb("positions", _positions, "what the ledger holds: open lots per instrument and side")
    p.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    p = verb("alerts", _alerts, "recent alerts, newest first")
    add_listing(p, since="alerts raised", limit=50)
    p = verb("sinks", _sinks, "the alert sinks (Telegram, Slack, a JSON webhook): what each"
             " got, waits for and gave up; `pgleader sinks test` sends each configured sink a"
             " test message (exit 1 when one fails)")  # fmt: skip
    p.add_argument("action", nargs="?", choices=["list", "test"], default="list",
                   help="list (default), or test: send a test message to every sink")  # fmt: skip
    add_sink_arguments(p)
    p.add_argument("--json", action="store_true", help="JSON lines even on a terminal")


async def _serve(args: argparse.Namespace) -> int:
    from service.process import serve

    config = from_args(args, resolve_dsn(args.dsn), timings_from(args))
    return await serve(config)


def _by() -> str:
    return f"cli:{os.environ.get('USER') or os.getuid()}@{os.uname().nodename}"[:200]


async def _set_halt(args: argparse.Namespace, mode: str, reason: str | None) -> int:
    async with await connect(require_dsn(args), autocommit=True) as conn:
        await _require_schema(conn)
        cur = await conn.execute(QUERIES["set_trading_halt"], [mode, reason, _by()])
        (before,) = await cur.fetchone() or (None,)
    if before == "rewound":
        print(
            f"pgleader {'resume' if mode == 'running' else 'halt'}: error: nothing changed:"
            " trading stays halted because the database went back in time (see the"
            " database_rewound alert); reconcile with the broker, then run"
            " `pgleader resume --after-rewind`",
            file=sys.stderr,
        )
        return 1
    _print({"trading": mode, "before": before, "reason": reason})
    return 0


async def _halt(args: argparse.Namespace) -> int:
    resolve_dsn(args.dsn)  # a bad database setting is named first, as by every verb
    if not args.reason:
        raise ConfigError("halt needs --reason: say why, for the alert and the log")
    return await _set_halt(args, "entries_only" if args.entries_only else "halted", args.reason)


async def _resume(args: argparse.Namespace) -> int:
    if args.open is not None and not args.after_rewind:
        raise ConfigError("--open goes with --after-rewind only")
    if args.after_rewind:
        async with await connect(require_dsn(args), autocommit=True) as conn:
            await _require_schema(conn)
            cur = await conn.execute(QUERIES["resume_after_rewind"], [_by(), args.open])
            before, held, resumed = await cur.fetchone() or (None, [], False)
        if not resumed:
            shown = ", ".join(str(i) for i in held[:20]) + (" ..." if len(held) > 20 else "")
            print(
                f"pgleader resume: error: {len(held)} signal(s) the database held from before"
                f" it went back in time are still open (ids {shown}): the lost commits may have"
                " executed them. Compare each with the broker (`pgleader reconcile`), then"
                " resume --after-rewind with --open end (never sent) or --open requeue (sent"
                " as usual); trading stays halted",
                file=sys.stderr,
            )
            return 1
        _print({"trading": "running", "before": before, "reason": None,
                "open_signals": list(held), "open": args.open if held else None})  # fmt: skip
        return 0
    return await _set_halt(args, "running", None)


async def _reconcile(args: argparse.Namespace) -> int:
    async with await connect(require_dsn(args), autocommit=True) as conn:
        await _require_schema(conn)
        cur = await conn.execute(QUERIES["request_reconciliation"], ["cli", _by()])
        (request_id,) = await cur.fetchone() or (None,)
        deadline = time.monotonic() + args.timeout
        while True:
            cur = await conn.execute(QUERIES["reconciliation"], [request_id])
            row = await cur.fetchone()
            run: dict[str, Any] = as_run(row) if row else {"outcome": None}
            if run["outcome"] is not None:
                break
            if time.monotonic() >= deadline:
                print(
                    f"pgleader reconcile: error: no leader ran reconciliation {request_id} within"
                    f" {args.timeout:g} s (is an instance leading?); it stays requested",
                    file=sys.stderr,
                )
                return 1
            await asyncio.sleep(0.1)
    if sys.stdout.isatty():
        print(f"reconciliation {run['id']}: {run['outcome']} ({run['detail']})")
        for item in run["items"]:
            print(f"  {item['instrument']:<24} {item['outcome']:<18} ledger {item['ledger']:>8}"
                  f"  broker {item['broker']:>8}")  # fmt: skip
    else:
        _print(run)
    return 0 if run["outcome"] == "matched" else 1


async def _settle(args: argparse.Namespace) -> int:
    resolve_dsn(args.dsn)  # a bad database setting is named first, as by every verb
    if args.signal_id is None:
        raise ConfigError("settle needs the signal's id: pgleader settle SIGNAL_ID --filled or"
                          " --not-filled --reason TEXT")  # fmt: skip
    if args.filled is None:
        raise ConfigError("settle needs --filled or --not-filled: what the broker's order book"
                          " shows for the signal's order")  # fmt: skip
    if not args.reason:
        raise ConfigError("settle needs --reason: what you saw at the broker, for the alert")
    async with await connect(require_dsn(args), autocommit=True) as conn:
        await _require_schema(conn)
        try:
            cur = await conn.execute(
                QUERIES["settle_signal"], [args.signal_id, args.filled, args.reason, _by()]
            )
        except psycopg.errors.UndefinedFunction:
            raise ConfigError("the gateway's schema is old: run `pgleader migrate` first") from None
        refused, before, status, instrument, ledger_lots = await cur.fetchone() or (None,) * 5
    if refused is not None:
        print(f"pgleader settle: error: {refused}; nothing changed", file=sys.stderr)
        return 1
    _print({"signal_id": args.signal_id, "before": before, "status": status,
            "instrument": instrument, "ledger_lots": ledger_lots})  # fmt: skip
    return 0


async def _stats(args: argparse.Namespace) -> int:
    async with await connect(require_dsn(args), autocommit=True) as conn:
        await _require_schema(conn)
        row = await (await conn.execute(QUERIES["statistics"])).fetchone()
    statistics, refreshed_at, epoch, instance = row or ({}, None, None, None)
    print(json.dumps({"refreshed_at": refreshed_at, "epoch": epoch, "by": instance,
                      "statistics": statistics}, default=str,
                     indent=2 if sys.stdout.isatty() else None))  # fmt: skip
    if refreshed_at is None:
        print("pgleader stats: no statistics yet: the leader's `statistics` job makes them"
              " (pgleader jobs run statistics)", file=sys.stderr)  # fmt: skip
    return 0


async def _rollover(args: argparse.Namespace) -> int:
    """What the leader's rollover job would do, and when: nothing is sent from here."""
    from datetime import UTC, datetime

    from service.instruments import load_instruments

    resolve_dsn(args.dsn)  # a bad database setting is named first, as by every verb
    path = args.instruments_file or env_setting("PGLEADER_INSTRUMENTS_FILE", Text(), "")
    if not path:
        raise ConfigError("rollover needs the instruments file: --instruments-file or"
                          " PGLEADER_INSTRUMENTS_FILE")  # fmt: skip
    futures = {n: i for n, i in load_instruments(Path(path)).items() if i.contract is not None}
    at = args.at or datetime.now(UTC)
    held: dict[str, Any] = {}
    if futures:
        async with await connect(require_dsn(args), autocommit=True) as conn:
            await _require_schema(conn)
            held = {
                r[0]: r for r in await (await conn.execute(QUERIES["open_contracts"])).fetchall()
            }
    rows = []
    for name, i in futures.items():
        rule, calendar = i.contract, i.calendar
        assert rule is not None and calendar is not None
        today = calendar.local_date(at)
        current = rule.contract_on(calendar, today)
        position = held.get(name)
        where = position[3] if position else None
        symbol = i.with_symbol(where).symbol if where else None
        if symbol is None:
            plan = f"flat: new entries open {current.symbol}"
        elif symbol == current.symbol:
            plan = f"rolls from {rule.roll_start(calendar, current.expiry)} (in session)"
        elif calendar.in_session(at):
            plan = f"rolls now to {current.symbol}"
        else:
            plan = f"roll to {current.symbol} due: at the next session"
        rows.append((name, f"{position[1]} {position[2]}" if position else "-", symbol or "-",
                     current.symbol, current.expiry, plan))  # fmt: skip
    names = ("instrument", "open", "contract", "current", "current_expiry", "plan")
    print_rows(names, rows, args.json)
    return 0


async def _sinks(args: argparse.Namespace) -> int:
    from service.alerts.messages import probe_message
    from service.alerts.sinks import build_sinks, send_to_each

    settings = sink_settings(args)  # a bad setting is named first, whatever the action
    if args.action == "list":
        async with await connect(require_dsn(args), autocommit=True) as conn:
            await _require_schema(conn)
            cur = await conn.execute(QUERIES["alert_delivery_status"])
            names = [c.name for c in cur.description or []]
            rows = await cur.fetchall()
        print_rows(names, rows, args.json)
        return 0
    sinks = build_sinks(settings)
    if not sinks:
        raise ConfigError(
            "no alert sink configured: set PGLEADER_TELEGRAM_TOKEN and"
            " PGLEADER_TELEGRAM_CHAT_ID, PGLEADER_SLACK_WEBHOOK_URL or PGLEADER_ALERT_WEBHOOK_URL"
        )
    sent = await send_to_each(sinks, probe_message(_by()), timeout=10)
    rows = [
        (sink.name, result.outcome, result.detail.removeprefix(f"{sink.name}: "))
        for sink, result in zip(sinks, sent, strict=True)
    ]
    print_rows(("sink", "outcome", "detail"), rows, args.json)
    return 0 if all(result.outcome == "delivered" for result in sent) else 1


async def _signals(args: argparse.Namespace) -> int:
    params = {"status": args.status, "limit": args.limit, **since_params(args.since)}
    async with await connect(require_dsn(args), autocommit=True) as conn:
        await _require_schema(conn)
        cur = await conn.execute(QUERIES["signal_list"], params)
        names = [c.name for c in cur.description or []]
        rows = await cur.fetchall()
    if as_json(args):
        print_rows(names, rows, True)
        return 0
    shown = ("id", "received_at", "type", "instrument", "position", "side", "lots", "status",
             "by", "epoch", "orders", "detail")  # fmt: skip
    picked = []
    for row in rows:
        r = dict(zip(names, row, strict=True))
        picked.append((r["id"], r["received_at"], r["type"], r["instrument"], r["position"],
                       r["side"], r["lots"], r["status"], r["received_by"], r["epoch"],
                       "; ".join(_order_text(o) for o in r["orders"]) or None,
                       _short(r["detail"])))  # fmt: skip
    print_rows(shown, picked, False)
    return 0


def _order_text(order: dict[str, Any]) -> str:
    """An order in a table cell: its outcome, where, and the net position it moved."""
    moved = f" {order['start_position']}->{order['target_position']}"
    return f"{order['outcome']} {order['symbol'] or '?'}{moved}"


def _short(text: str | None, width: int = 60) -> str | None:
    text = " ".join(text.split()) if text else text
    return text if text is None or len(text) <= width else text[: width - 3] + "..."


async def _positions(args: argparse.Namespace) -> int:
    async with await connect(require_dsn(args), autocommit=True) as conn:
        await _require_schema(conn)
        cur = await conn.execute(QUERIES["open_position_list"])
        names = [c.name for c in cur.description or []]
        rows = await cur.fetchall()
    print_rows(names, rows, as_json(args))
    return 0


async def _alerts(args: argparse.Namespace) -> int:
    params = {"limit": args.limit, **since_params(args.since)}
    async with await connect(require_dsn(args), autocommit=True) as conn:
        await _require_schema(conn)
        cur = await conn.execute(QUERIES["alert_list"], params)
        names = [c.name for c in cur.description or []]
        rows = await cur.fetchall()
    if as_json(args):
        print_rows(names, rows, True)
    else:
        print_rows(names, [(*row[:5], _short(row[5], 100)) for row in rows], False)
    return 0


async def _require_schema(conn: Any) -> None:
    cur = await conn.execute(QUERIES["schema_has_kill_switch"])
    if not (await cur.fetchone())[0]:
        raise ConfigError("the gateway's schema is missing or old: run `pgleader migrate` first")


def _print(row: dict[str, Any]) -> None:
    print(json.dumps(row, default=str))
