"""The `pgleader` command: migrate, status, watch, elect, demo (+ verbs plugged in by packages).

Every verb takes --dsn (else PGLEADER_DSN, else DATABASE_URL). Errors end in one
line on stderr and a non-zero exit, never a traceback.
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
from datetime import datetime
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
    Text,
    Timings,
    default_instance_id,
    env_setting,
    resolve_dsn,
)
from pgleader.connect import connect
from pgleader.errors import ConfigError, PgLeaderError, first_line

T = TypeVar("T")

__all__ = [
    "add_common", "add_timings", "main", "print_rows", "require_dsn", "run", "timings_from",
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


async def _watch(args: argparse.Namespace) -> int:
    from pgleader.events import Reconnected, listen

    dsn = require_dsn(args)
    await (await connect(dsn)).close()  # fail fast on a wrong DSN; later drops reconnect
    async for item in listen(dsn, *args.channel):
        if isinstance(item, Reconnected):
            print(json.dumps({"event": "watching", "reconnects": item.attempt}), flush=True)
        else:
            print(item.payload, flush=True)
    return 0


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
    p = verb("watch", _watch, "print every pgleader_events notification as a JSON line")
    p.add_argument(
        "--channel", action="append", default=[], type=Text(63), help="channel (repeatable)"
    )
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
    except PgLeaderError as exc:
        print(f"pgleader {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except psycopg.Error as exc:
        print(f"pgleader {args.verb}: database error: {first_line(exc)}", file=sys.stderr)
        return 1
