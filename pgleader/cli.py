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
from collections.abc import Awaitable, Callable, Coroutine
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
    env_setting,
    resolve_dsn,
)
from pgleader.connect import connect
from pgleader.errors import ConfigError, PgLeaderError, first_line

T = TypeVar("T")

__all__ = ["add_common", "add_timings", "main", "require_dsn", "run", "timings_from"]

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
    args = build_parser().parse_args(argv)
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
