"""The `pgleader` command: migrate, status, history, instances, watch, elect, jobs,
transfer, doctor, demo (+ verbs plugged in by packages).

Every verb takes --dsn (else PGLEADER_DSN, else DATABASE_URL). Errors end in one
line on stderr and a non-zero exit, never a traceback: 1 when the database failed
or cannot be reached, 2 for a usage error (a bad argument or setting).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from importlib.metadata import entry_points
from typing import Any, NoReturn, TypeVar

import psycopg

from pgleader import __version__
from pgleader.config import (
    EVICT_AFTER_RANGE,
    HEARTBEAT_RANGE,
    LEASE_RANGE,
    Dsn,
    Number,
    Since,
    Text,
    Timings,
    default_instance_id,
    env_setting,
    resolve_dsn,
)
from pgleader.connect import connect
from pgleader.errors import ConfigError, DatabaseUnavailable, PgLeaderError, first_line

T = TypeVar("T")

__all__ = [
    "add_common", "add_listing", "add_timings", "as_json", "main", "print_rows", "require_dsn",
    "run", "since_params", "timings_from",
]  # fmt: skip

Command = Callable[[argparse.Namespace], Awaitable[int]]


class _Parser(argparse.ArgumentParser):
    """argparse, but a refused argument is one line naming it, like every pgleader error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        type=Dsn(),
        help="PostgreSQL connection string (default: $PGLEADER_DSN, else $DATABASE_URL)",
    )


_TIMINGS = (
    ("heartbeat", Number(float, *HEARTBEAT_RANGE, "s"), "leader heartbeat interval, s"),
    ("lease", Number(float, *LEASE_RANGE, "s"), "leader steps down after this long without a good beat, s"),
    ("evict_after", Number(float, *EVICT_AFTER_RANGE, "s"), "followers evict a leader silent this long, s"),
)  # fmt: skip


def add_timings(parser: argparse.ArgumentParser, prefix: str = "PGLEADER_") -> None:
    """--heartbeat, --lease, --evict-after; each read from `prefix`NAME when not given
    (by timings_from, so a bad variable is refused only by the verbs that use it)."""
    defaults = Timings()
    for name, kind, text in _TIMINGS:
        env = f"{prefix}{name.upper()}"
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"{text} (env {env}, default {getattr(defaults, name):g})",
        )
    parser.set_defaults(timings_prefix=prefix)


def timings_from(args: argparse.Namespace) -> Timings:
    """The timings of the flags, else of the environment, else the defaults; validated."""
    prefix = getattr(args, "timings_prefix", "PGLEADER_")
    defaults = Timings()
    values = {
        name: env_setting(f"{prefix}{name.upper()}", kind, getattr(defaults, name))
        if getattr(args, name, None) is None
        else getattr(args, name)
        for name, kind, _ in _TIMINGS
    }
    return Timings(**values).validate()


def add_listing(parser: argparse.ArgumentParser, *, since: str, limit: int | None = None) -> None:
    """--json, --since (what it bounds: `since`) and, when given a default, --limit:
    the options of a verb that lists rows for people."""
    parser.add_argument("--since", type=Since(), default=None, metavar="WHEN",
                        help=f"only {since} since then: 90s, 30m, 2h, 1d back, or an ISO time"
                        " (2026-12-24T10:00+05:30; without a zone: local time)")  # fmt: skip
    if limit is not None:
        parser.add_argument("--limit", type=Number(int, 1, 10000), default=limit,
                            help=f"at most this many rows, the latest (default {limit})")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="JSON lines even on a terminal")


def since_params(since: datetime | timedelta | None) -> dict[str, Any]:
    """A --since value as a query's parameters: since_at (a time), or since_s (seconds
    back from now by the database's clock, which the stored times are stamped by)."""
    if isinstance(since, timedelta):
        return {"since_at": None, "since_s": since.total_seconds()}
    return {"since_at": since, "since_s": None}


def as_json(args: argparse.Namespace) -> bool:
    """JSON lines when asked (--json) or when stdout is not a terminal."""
    return bool(getattr(args, "json", False)) or not sys.stdout.isatty()


def require_dsn(args: argparse.Namespace) -> str:
    dsn = resolve_dsn(getattr(args, "dsn", None))
    if not dsn:
        raise ConfigError("no database given: use --dsn, PGLEADER_DSN or DATABASE_URL")
    return dsn


async def _migrate(args: argparse.Namespace) -> int:
    from pgleader.migrations import migrate

    applied = await migrate(require_dsn(args), only=args.only)
    print(json.dumps({"applied": applied}))
    return 0


async def _status(args: argparse.Namespace) -> int:
    from pgleader.queries import QUERIES

    conn = await connect(require_dsn(args), autocommit=True)
    async with conn:
        try:
            cur = await conn.execute(QUERIES["leaders"])
        except psycopg.errors.UndefinedTable:
            raise ConfigError("pgleader schema missing: run `pgleader migrate` first") from None
        names = [c.name for c in cur.description or []]
        for row in await cur.fetchall():
            print(json.dumps(dict(zip(names, row, strict=True)), default=str))
    return 0


def print_rows(names: Sequence[str], rows: Sequence[Sequence[Any]], as_json: bool) -> None:
    """Rows for people: an aligned table on a terminal; JSON lines when piped or asked."""
    if as_json or not sys.stdout.isatty():
        for row in rows:
            print(json.dumps(dict(zip(names, row, strict=True)), default=str), flush=True)
        return
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(name), *(len(r[i]) for r in cells)]) for i, name in enumerate(names)]
    for line in ([n.upper() for n in names], *cells):
        print("  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip())


def _duration_text(seconds: float | None) -> str | None:
    """Seconds for people: 42s, 12m 05s, 3h 04m, 2d 03h."""
    if seconds is None:
        return None
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value else "0"
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return " ".join(str(value).split())


def _election(args: argparse.Namespace) -> str:
    return args.election or env_setting("PGLEADER_ELECTION", Text(200), "gateway")


async def _history(args: argparse.Namespace) -> int:
    """`pgleader history`: who led the election when, and how each term ended."""
    from pgleader.queries import QUERIES

    params = {"election": _election(args), "limit": args.limit, **since_params(args.since)}
    async with await connect(require_dsn(args), autocommit=True) as conn:
        try:
            cur = await conn.execute(QUERIES["leadership_timeline"], params)
        except psycopg.errors.UndefinedTable:
            raise ConfigError("pgleader schema missing: run `pgleader migrate` first") from None
        names = [c.name for c in cur.description or []]
        rows = await cur.fetchall()
    if as_json(args):
        print_rows(names, rows, True)
    else:
        shown = ("epoch", "leader", "host", "from", "to", "duration", "reason")
        print_rows(shown, [(*row[:5], _duration_text(row[5]), row[6]) for row in rows], False)
    return 0


async def _instances(args: argparse.Namespace) -> int:
    """`pgleader instances`: the election's registry, each with its heartbeat's age."""
    from pgleader.queries import QUERIES

    stale_after = args.stale_after if args.stale_after is not None else Timings().evict_after
    params = {"election": _election(args), "stale_after": stale_after}
    async with await connect(require_dsn(args), autocommit=True) as conn:
        try:
            cur = await conn.execute(QUERIES["instance_list"], params)
        except psycopg.errors.UndefinedTable:
            raise ConfigError("pgleader schema missing: run `pgleader migrate` first") from None
        names = [c.name for c in cur.description or []]
        rows = await cur.fetchall()
    if as_json(args):
        print_rows(names, rows, True)
    else:
        shown = ("instance_id", "host", "pid", "version", "leader", "heartbeat_age", "stale",
                 "started_at")  # fmt: skip
        picked = [(*row[:5], _duration_text(row[5]), row[6], row[7]) for row in rows]
        print_rows(shown, picked, False)
    return 0


async def _jobs(args: argparse.Namespace) -> int:
    """`pgleader jobs`: every job and its last run; `pgleader jobs run NAME`: one run now."""
    from pgleader.queries import QUERIES

    if args.action == "run":
        return await _run_job(args)
    election = args.election or env_setting("PGLEADER_ELECTION", Text(200), None)
    conn = await connect(require_dsn(args), autocommit=True)
    async with conn:
        try:
            cur = await conn.execute(QUERIES["job_list"], {"election": election})
        except psycopg.errors.UndefinedTable:
            raise ConfigError("pgleader schema missing: run `pgleader migrate` first") from None
        names = [c.name for c in cur.description or []]
        rows = await cur.fetchall()
    if args.json or not sys.stdout.isatty():
        print_rows(names, rows, True)
    else:
        shown = ("election", "job", "schedule", "due_in_s", "running", "outcome",
                 "duration_s", "failures", "finished_at", "result")  # fmt: skip
        picked = [[row[names.index(n)] for n in shown] for row in rows]
        print_rows(shown, picked, False)
    return 0


async def _run_job(args: argparse.Namespace) -> int:
    from pgleader.queries import QUERIES

    election = _election(args)
    conn = await connect(require_dsn(args), autocommit=True)
    async with conn:
        try:
            cur = await conn.execute(
                QUERIES["request_job"], [election, args.name, f"cli:{default_instance_id()}"]
            )
        except psycopg.errors.UndefinedFunction:
            raise ConfigError("pgleader schema missing: run `pgleader migrate` first") from None
        row = await cur.fetchone()
        if row is None or row[0] is None:
            cur = await conn.execute(QUERIES["job_list"], {"election": election})
            known = ", ".join(r[1] for r in await cur.fetchall()) or "none yet: has a leader run?"
            raise ConfigError(f"no job {args.name!r} in election {election!r} (known: {known})")
        requested_at = row[0]
        deadline = time.monotonic() + args.timeout
        while True:
            cur = await conn.execute(QUERIES["job_run_state"], [requested_at, election, args.name])
            state = await cur.fetchone()
            if state is not None and state[0]:
                break
            if time.monotonic() >= deadline:
                print(json.dumps({"job": args.name, "election": election, "outcome": None,
                                  "error": f"no result within {args.timeout:g} s (is there a"
                                  " leader? the request stays: it runs when one leads)"}))  # fmt: skip
                return 1
            await asyncio.sleep(0.1)
    _, outcome, result, duration, started, finished = state
    print(json.dumps({"job": args.name, "election": election, "outcome": outcome,
                      "result": result, "duration_s": duration, "started_at": started,
                      "finished_at": finished}, default=str))  # fmt: skip
    return 0 if outcome == "succeeded" else 1


async def _transfer(args: argparse.Namespace) -> int:
    """`pgleader transfer --to ID`: a switchover through the database alone. The
    election row names the target; the leader sees it on its next heartbeat, lets
    its in-flight work end and resigns; for the bound only the target may take the
    lock. Prints the new leader when the target is elected; exit 1 when refused
    (the reason in one line) or when the target did not lead within --timeout."""
    from pgleader.queries import QUERIES

    election, dsn = _election(args), require_dsn(args)  # a bad variable first: it names it
    if not args.to:
        raise ConfigError("name the instance to hand the lead to: --to ID")
    bound = args.bound if args.bound is not None else 2 * Timings().evict_after
    live_within = Timings().evict_after
    started = time.monotonic()
    async with await connect(dsn, autocommit=True) as conn:
        try:
            cur = await conn.execute(
                QUERIES["request_transfer"], [election, args.to, None, live_within, bound]
            )
        except psycopg.errors.UndefinedFunction:
            raise ConfigError("pgleader schema missing: run `pgleader migrate` first") from None
        row = await cur.fetchone()
        if row is not None and row[0] is not None:
            print(f"pgleader transfer: refused: {row[0]}", file=sys.stderr)
            return 1
        deadline = started + args.timeout
        while True:
            cur = await conn.execute(QUERIES["election_state"], [election])
            state = await cur.fetchone()
            if state is not None and state[0] == args.to:
                break
            if time.monotonic() >= deadline:
                leader = state[0] if state is not None else None
                print(f"pgleader transfer: {args.to} did not lead within {args.timeout:g} s"
                      f" (the leader now: {leader or 'none'})", file=sys.stderr)  # fmt: skip
                return 1
            await asyncio.sleep(0.02)
    print(json.dumps({"election": election, "leader": args.to, "epoch": state[1],
                      "seconds": round(time.monotonic() - started, 3)}))  # fmt: skip
    return 0


async def _watch(args: argparse.Namespace) -> int:
    from pgleader.events import EVENTS_CHANNEL, Reconnected, listen

    dsn = require_dsn(args)
    await (await connect(dsn)).close()  # fail fast on a wrong DSN; later drops reconnect
    async for item in listen(dsn, *args.channel):
        if not args.human:
            if isinstance(item, Reconnected):
                print(json.dumps({"event": "watching", "reconnects": item.attempt}), flush=True)
            else:
                print(item.payload, flush=True)
        elif isinstance(item, Reconnected):
            channels = ", ".join(args.channel or [EVENTS_CHANNEL])
            note = " (reconnected: events meanwhile were missed)" if item.attempt else ""
            print(f"{_clock(None)}  watching {channels}{note}", flush=True)
        else:
            print(_human_event(item.payload), flush=True)
    return 0


def _human_event(payload: str) -> str:
    """One notification as `watch --human` prints it: its time, then what happened."""
    from pgleader.events import describe_event, parse_event

    try:
        event = parse_event(payload)
    except ValueError:  # another channel's payload may be any text
        return f"{_clock(None)}  {' '.join(payload.split())}"
    return f"{_clock(event.get('at'))}  {describe_event(event)}"


def _clock(at: Any) -> str:
    """An event's ISO time (else now) in this machine's time zone, to the second."""
    try:
        when = datetime.fromisoformat(str(at)) if at else datetime.now().astimezone()
    except ValueError:
        when = datetime.now().astimezone()
    return _cell(when)


async def _elect(args: argparse.Namespace) -> int:
    """Run one elector and print its transitions as JSON lines (demo and tests use it)."""
    from pgleader.election import Elector
    from pgleader.errors import NotLeader

    dsn = require_dsn(args)
    elector = Elector(dsn, args.election, instance_id=args.instance_id, timings=timings_from(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def emit(**fields: Any) -> None:
        print(json.dumps({"instance": elector.instance_id, **fields}), flush=True)

    elector.on_transition(lambda t: emit(event=t.kind, epoch=t.epoch, reason=t.reason, at=t.at))
    async with elector, await connect(dsn, autocommit=True) as work:
        emit(event="started", at=loop.time())
        acted: set[int] = set()
        while not stop.is_set():
            # The work loop of a real service: act only through the fence.
            if elector.epoch is not None:
                try:
                    async with work.transaction():
                        epoch = await elector.fence(work)
                    if epoch not in acted:
                        acted.add(epoch)
                        emit(event="acting", epoch=epoch)
                except NotLeader as exc:
                    emit(event="fence_refused", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), elector.timings.heartbeat / 4)
    emit(event="stopped")
    return 0


async def _doctor(args: argparse.Namespace) -> int:
    """`pgleader doctor`: one line per check of the deployment; exit 1 when one fails,
    2 when the database cannot be reached (a failed check is 1: they must differ)."""
    from pgleader.doctor import diagnose, failed

    dsn = require_dsn(args)
    try:
        findings = await diagnose(dsn)
    except (DatabaseUnavailable, psycopg.OperationalError) as exc:
        raise ConfigError(str(exc) if isinstance(exc, PgLeaderError) else first_line(exc)) from None
    for finding in findings:
        print(json.dumps(finding.as_dict()) if as_json(args) else finding.line(), flush=True)
    return 1 if failed(findings) else 0


async def _demo(args: argparse.Namespace) -> int:
    from pgleader.demo import run_demo

    return await run_demo(resolve_dsn(args.dsn), rounds=args.rounds)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pgleader", description="Leader election and fencing on PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"pgleader {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, func: Command, text: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=text, description=text)
        add_common(p)
        p.set_defaults(func=func)
        return p

    p = verb(
        "migrate",
        _migrate,
        "apply what is missing of every installed schema stream (pgleader's, then"
        " those plugged in, such as the gateway's)",
    )
    p.add_argument(
        "--only",
        action="append",
        type=Text(63),
        metavar="STREAM",
        help="apply this stream alone, e.g. pgleader (repeatable)",
    )
    verb("status", _status, "print the pgleader.leader view as JSON lines")
    p = verb("history", _history, "the leadership timeline of an election: epoch, leader,"
             " from, to, duration, how each term ended")  # fmt: skip
    _add_election(p)
    add_listing(p, since="terms still on", limit=50)
    p = verb("instances", _instances, "the instances of an election: heartbeat age, leader,"
             " stale")  # fmt: skip
    _add_election(p)
    p.add_argument("--stale-after", type=Number(float, 0.1, 86400, "s"), default=None,
                   help="stale: no heartbeat for this long, s (default the default evict-after,"
                   f" {Timings().evict_after:g})")  # fmt: skip
    p.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    p = verb("watch", _watch, "print every pgleader_events notification as a JSON line"
             " (--human: as a line of words)")  # fmt: skip
    p.add_argument(
        "--channel", action="append", default=[], type=Text(63), help="channel (repeatable)"
    )
    p.add_argument("--human", action="store_true",
                   help="each event as a readable line: time, who, what (not JSON)")  # fmt: skip
    p = verb("elect", _elect, "run one elector and print its transitions as JSON lines")
    p.add_argument("--election", default="default", type=Text(200))
    p.add_argument("--instance-id", default=None, type=Text(200))
    add_timings(p)
    p = verb("jobs", _jobs, "list the leader's periodic jobs: schedule, next run, last outcome"
             " (`pgleader jobs run NAME` runs one now)")  # fmt: skip
    p.add_argument("action", nargs="?", choices=["list", "run"], default="list",
                   help="list (default), or run NAME now")  # fmt: skip
    p.add_argument("name", nargs="?", type=Text(63), help="the job to run (with `run`)")
    p.add_argument("--election", type=Text(200), default=None,
                   help="election (env PGLEADER_ELECTION; without either: all to list, gateway to run)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    p.add_argument("--timeout", type=Number(float, 1, 3600, "s"), default=60.0,
                   help="with run: seconds to wait for the run's outcome (default 60)")  # fmt: skip
    p = verb("transfer", _transfer, "hand the lead to a named instance (a switchover): the"
             " leader ends its in-flight work and resigns; only that instance may take over for"
             " a bounded time, then any may")  # fmt: skip
    p.add_argument("--to", type=Text(200), default=None, metavar="ID",
                   help="the instance to lead next: alive, eligible (see `pgleader instances`)")  # fmt: skip
    _add_election(p)
    p.add_argument("--bound", type=Number(float, 0.5, 3600, "s"), default=None,
                   help="seconds only the target may take the lock; then any instance may"
                   f" (default {2 * Timings().evict_after:g}: twice the default evict-after)")  # fmt: skip
    p.add_argument("--timeout", type=Number(float, 0.1, 3600, "s"), default=30.0,
                   help="seconds to wait for the target's election (default 30)")  # fmt: skip
    p = verb("doctor", _doctor, "check the deployment the README promises is safe: a direct"
             " election connection (no transaction-mode pooler), synchronous_commit and"
             " synchronous standbys, track_commit_timestamp, the server's version and role;"
             " one line each (ok, warn, fail); exit 1 when one fails")  # fmt: skip
    p.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    p = verb("demo", _demo, "three electors, kill the leader, print the measured takeover")
    p.add_argument("--rounds", type=Number(int, 1, 1000), default=3)
    for ep in entry_points(group="pgleader.commands"):
        try:
            register: Callable[[Any], None] = ep.load()
        except ImportError as exc:  # a broken plugin must not take migrate/status down
            print(f"pgleader: verb {ep.name!r} unavailable: {exc}", file=sys.stderr)
            continue
        register(verbs)
    return parser


def _add_election(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--election", type=Text(200), default=None,
                        help="election (env PGLEADER_ELECTION, default gateway)")  # fmt: skip


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on uvloop where it is installed (a faster event loop: less CPU per
    request and per query), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "jobs" and (args.action == "run") != (args.name is not None):
        parser.exit(2, "pgleader jobs: error: give a job to run as `pgleader jobs run NAME`"
                    " (see pgleader jobs --help)\n")  # fmt: skip
    try:
        return int(run(args.func(args)))
    except DatabaseUnavailable as exc:
        print(f"pgleader {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except PgLeaderError as exc:
        print(f"pgleader {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except psycopg.Error as exc:
        print(f"pgleader {args.verb}: database error: {first_line(exc)}", file=sys.stderr)
        return 1
