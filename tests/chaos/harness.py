"""A Jepsen-style campaign: real processes, injected faults, a recorded history.

    PostgreSQL, a primary and a synchronous standby (owned by the campaign: restarted,
      ^ ^ ^ ^   stopped, failed over; tests.chaos.database), reached through a multi-host
      ^ ^ ^ ^   DSN; one blackholing proxy per instance and node (partitions)
    gw1 gw2 gw3 gw4   real `pgleader serve` processes (SIGKILL, SIGSTOP, SIGTERM);
      |  ^ ^ ^ ^      gw4 runs with --no-lead: it takes webhooks, never leads;
      |  ^            switchovers to a live, a killed and the no-lead instance (transfer_*)
      |  ^            gw3's data directory (its spool) on a small disk of its own (disk_full)
      |  ^            their instruments file, rewritten once: a futures roll falls due (rollover)
      |  ^            their optional cache, a redis-server of the campaign's own (SIGKILL,
      |  ^            SIGSTOP, wrong entries: it must never change what is kept or executed)
      |  load generator: one strategy per instrument (tests.chaos.workload), long
      |  and short, round-robin over the instances; every request and answer logged
      v
    the fake OpenAlgo, a process of its own (tests.chaos.broker): slow, 5xx,
    applies then drops, 429, 403, SIGSTOP

Faults come from a seeded schedule, so a failing seed replays. At the end the
faults stop, everything is healed and restarted, the system gets a quiet
period, and `checker.check` reads the log, the database and the broker's book.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import cycle
from pathlib import Path
from typing import Any

import aiohttp

from pgleader.events import parse_event
from pgleader.migrations import migrate
from service.intake.signals import fingerprint_raw
from tests.chaos.broker import (
    API_KEY,
    INSTRUMENTS,
    ROLL_DAYS_BEFORE,
    FakeBroker,
    Traded,
    futures,
    write_instruments_file,
)
from tests.chaos.database import FailoverPair
from tests.chaos.proxy import BlackholeProxy
from tests.chaos.workload import MOVES, SLOW, SLOW_EVERY, Trader
from tests.support.diskfull import SmallDisk
from tests.support.gateway import ADMIN_TOKEN, GatewayProcess, pgleader_cli
from tests.support.redis import RedisServer

BROKER_FAULTS = (
    "broker_latency",  # answers after the client gave up, applied before settling
    "broker_5xx",  # 5xx before applying
    "broker_drop",  # applies, then drops the connection unanswered
    "broker_429",  # a burst of 429 on every endpoint
    "broker_403",  # the broker session expired, for a while
    "broker_pause",  # SIGSTOP, then SIGCONT, of the fake's process
    "broker_reject",  # orders accepted (an orderid), then rejected by the broker's risk checks
    "broker_open",  # orders stay open a while before they fill (some past the confirmation)
)
TRANSFER_FAULTS = (
    "transfer_live",  # to a live eligible follower: it must be the next elected
    "transfer_dead",  # to a follower just SIGKILLed: refused, or accepted and another leads
    "transfer_ineligible",  # to the --no-lead instance: refused, the leadership unchanged
)
REDIS_FAULTS = (
    "redis_kill",  # SIGKILL, restarted empty a few seconds later
    "redis_pause",  # SIGSTOP, then SIGCONT
    "redis_garbage",  # wrong entries, and fingerprints of signals never stored (planted)
)
FAULTS = (
    "kill",
    "pause",
    "pause_waiter",  # SIGSTOP the follower waiting longest on the lock, SIGKILL the leader
    "partition",
    "restart_fast",
    "restart_immediate",
    "db_down",
    "sigterm",
    "disk_full",
    "db_failover",  # the primary crashes, its synchronous standby is promoted
    "rollover",  # at most once a round: the futures' roll falls due (Campaign.rollover)
    *TRANSFER_FAULTS,
    *BROKER_FAULTS,
    *REDIS_FAULTS,
)
# The faults during which the primary is down (a planting redis_garbage lasts until
# the end of the next one: Redis is read only then).
DB_OUTAGES = ("restart_fast", "restart_immediate", "db_down", "disk_full", "db_failover")
# db_failover: crash -> promote, s; how long a standby's rebuild (or the next failover's
# wait for it to stream synchronously) may take.
FAILOVER_GAP = (0.2, 3.0)
REBUILD_WAIT = 120.0
# redis_kill's and redis_pause's length, s; what the gateways name their entries
# (pgleader.redis, service.intake.fingerprint_cache); how long redis_garbage plants
# fingerprints at most, waiting for a database outage to end.
REDIS_DOWN = (1.0, 4.0)
LEADER_KEY = "pgleader:gateway:leader"
FP_KEY = "pgleader:gateway:fp:"
PLANT_AT_MOST = 30.0
GARBAGE = ("", "not-a-signal-id", "-1", "0", "3.5", "99999999999999999999", "\xff\xfe")
# Fast election timings so a campaign fits in minutes; the rules of Timings still hold.
TIMINGS = ["--heartbeat", "0.2", "--lease", "0.6", "--evict-after", "1.2"]
BROKER_TIMEOUT = 1.0
BROKER_SETTLE = 2.5  # at least twice the timeout (the gateway refuses less)
EXTRA = [
    "--sweep-interval", "0.2", "--startup-timeout", "120",
    "--broker-timeout", str(BROKER_TIMEOUT), "--broker-settle", str(BROKER_SETTLE),
]  # fmt: skip
EVICT_AFTER = 1.2
# TradingView re-sends a 5xx answer after 5 s, up to 3 times, with the same body;
# here sooner, the campaign's time being compressed.
RESEND_AFTER = 1.0
RESENDS = 2
# At most this long after the faults for everything to settle: a 403 holds sends 10 s
# and more (backoff), a 429 2 s, a broker outage its settle time, then the backlog drains.
QUIET = 150.0
# A broker fault of the next few calls lasts until they came, at most this long (a
# seldom-traded instrument's next order may be 12 s away; others' come every second
# unless an outage holds them).
FAULT_CALLS_WAIT = 5.0
SLOW_FAULT_CALLS_WAIT = 12.0
# After a 403 the executor holds every send at least 10 s (service.brokers.openalgo:
# a human must log in to the broker again), with a margin.
AFTER_403 = 12.0
# The instance whose data directory is on a small disk; big enough for every outage's spool.
DISK_FULL_NODE = "gw3"
SMALL_DISK_BYTES = 4 << 20
# Less room than one spooled record (~310 bytes here): an append that does not fit must be
# refused whole (503), never half-written and answered 202.
DISK_FULL_LEAVE = 200
# The leader's rollover job every second (the default is a minute).
ENV = {"PGLEADER_ROLLOVER_INTERVAL": "1"}
# How long the rollover fault waits, at most, for the futures to be open in their near
# contract with no signal of theirs from before the hold waiting (before it rewrites the
# file: a backlog after a broker_403 takes 20 s and more), and for the new leader to roll.
HOLD_WAIT = 30.0
ROLL_WAIT = 10.0
# A fourth instance that may not lead (--no-lead): the load generator posts to it like
# to the others. A fourth process rather than one of three made so: the failovers keep
# three eligible instances, so a killed follower (transfer_dead) still leaves two.
NO_LEAD_NODE = "gw4"
ELECTION = "gateway"
# A switchover's bound: only the named target may take the lock this long (the
# gateway's default, 2 x evict_after; `pgleader transfer` is told it with --bound).
TRANSFER_BOUND = 2 * EVICT_AFTER
# Generous bounds (a switchover takes tens of ms here): the live target's election
# after the request, and any election after a transfer to a killed target (the bound,
# then a takeover); how long a transfer waits for a leader and a live follower.
TRANSFER_WAIT = 15.0
LEADERLESS_AT_MOST = TRANSFER_BOUND + 15.0
TRANSFER_READY_WAIT = 30.0
CLI_REFUSED = "pgleader transfer: refused: "


@dataclass
class Request:
    sent_at: float
    instance: str
    fingerprint: str
    status: int | None  # None: no answer (refused, timed out)
    body: dict[str, Any] | None
    answered_at: float  # or given up on; the instance spooled or refused just before
    resent: int = 0  # how many times this body was sent before (TradingView's re-sends)


@dataclass
class Transfer:
    """One switchover fault and what came of it (the checker's `transfer` rule)."""

    kind: str  # one of TRANSFER_FAULTS
    via: str  # "http" (POST /coordinator/transfer) or "cli" (pgleader transfer)
    to: str
    leader: str  # the leader when asked
    epoch: int  # its epoch
    answer: str  # "accepted", "refused", or what came instead ("409 not_leader", "exit 2")
    said: str  # the refusal's reason, verbatim; else the answer's text
    # (instance, epoch, seconds after the request) of each election awaited after it:
    # the first, and for a killed target each until another instance leads
    elections: list[tuple[str, int, float]] = field(default_factory=list)
    waited: float = 0.0  # how long elections were awaited (not at all when refused)
    after: tuple[int, str | None] | None = None  # (epoch, leader) once refused


def describe_transfer(t: Transfer) -> str:
    """A transfer's outcome in a line: "accepted; gw2 elected (epoch 7) in 0.05 s"."""
    if t.answer == "refused":
        after = f"epoch {t.after[0]} led by {t.after[1]}" if t.after else "unknown"
        return f"refused: {t.said!r}; then {after}"
    outcome = ", then ".join(
        f"{name} elected (epoch {epoch}) in {took:.2f} s" for name, epoch, took in t.elections
    )
    if not t.elections or (t.kind == "transfer_dead" and t.elections[-1][0] == t.to):
        outcome += (", then " if outcome else "") + f"nobody elected within {t.waited:.1f} s"
    said = "" if t.answer == "accepted" else f" ({t.said[:200]})"
    return f"{t.answer}{said}; {outcome}"


def answer_of(r: Request) -> str:
    """An answer as the summary counts it: "202 spooled", "503 unavailable", "no answer"."""
    if r.status is None:
        return "no answer"
    return f"{r.status} {(r.body or {}).get('status')}"


@dataclass
class PausedWaiter:
    """One pause_waiter, by the wall clock: the checker's `waiter` rule reads the
    elections between the pause and the resume in pgleader.leadership_history."""

    waiter: str  # paused, its lock wait in flight
    leader: str  # SIGKILLed right after
    paused_at: float
    resumed_at: float
    granted: bool  # the server granted the paused session the lock (it waited first)


@dataclass
class Failover:
    """One db_failover, by the wall clock (as the database's timestamps): the checker
    finds the first election after it in pgleader.leadership_history."""

    crashed_at: float  # the old primary's pg_ctl stop -m immediate returned
    promoting_at: float  # pg_ctl promote asked, after the gap
    promoted_at: float  # the standby accepts writes
    old_port: int
    new_port: int
    rebuilt_s: float | None = None  # the next standby streaming synchronously, after promotion
    rebuild_error: str | None = None


@dataclass
class History:
    seed: int
    started: float = field(default_factory=time.monotonic)
    requests: list[Request] = field(default_factory=list)
    faults: list[tuple[float, str, str]] = field(default_factory=list)  # (time, fault, target)
    moves: Counter[str] = field(default_factory=Counter)  # the workload's, by kind (MOVES)
    # each disk_full fault's (database down, disk filled, disk freed, database back) times
    disk_full: list[tuple[float, float, float, float]] = field(default_factory=list)

    # (time, instance, pid, rss_kb, connections): the soak's resource samples
    samples: list[tuple[float, str, int, int, int]] = field(default_factory=list)
    # the breakdown (application_name, state, count) of the most sessions one instance held
    session_peak: dict[str, Any] = field(default_factory=dict)
    transfers: list[Transfer] = field(default_factory=list)
    failovers: list[Failover] = field(default_factory=list)
    paused_waiters: list[PausedWaiter] = field(default_factory=list)
    # fingerprints Redis was made to hold before their signal was first sent
    planted: set[str] = field(default_factory=set)

    def fault(self, kind: str, target: str, detail: str = "") -> None:
        self.faults.append((time.monotonic(), kind, target))
        at = time.monotonic() - self.started
        print(f"  fault {kind:19} {target:8} +{at:.1f} s {detail}".rstrip(), flush=True)

    def transfer(self, t: Transfer) -> None:
        self.transfers.append(t)
        print(f"    {t.kind} {t.leader} -> {t.to} via {t.via}: {describe_transfer(t)}", flush=True)


class Campaign:
    def __init__(
        self, seed: int, duration: float, rate: float, workdir: Path, *, broker_rate: int = 10
    ) -> None:
        self.seed = seed
        self.random = random.Random(seed)
        self.broker_random = random.Random(seed + 10**9)  # its lane's: replays whatever the timing
        self.redis_random = random.Random(seed + 2 * 10**9)  # the Redis lane's
        self._plant_ids = random.Random(seed * 31)  # the wrong ids planted fingerprints name
        self.duration = duration
        self.rate = rate  # signals per second, all instruments together (about)
        self.workdir = workdir
        self.history = History(seed)
        self.server = FailoverPair(workdir / "pg")
        self._rebuilt: asyncio.Task[None] | None = None  # the standby's, after a failover
        # one proxy per instance and database node (slot): a partition blackholes both
        self.proxies: dict[str, list[BlackholeProxy]] = {}
        self.redis = RedisServer(workdir / "redis")
        self._planting: Any = None  # redis_garbage's client while it plants fingerprints
        self._outages = 0  # database outages over so far (DB_OUTAGES)
        self._outage_over = asyncio.Condition()
        self.nodes: dict[str, GatewayProcess] = {}
        self.disk: SmallDisk | None = None
        self.broker = FakeBroker(workdir / "openalgo.log", rate=broker_rate)
        self.broker_rate = broker_rate
        traded = INSTRUMENTS + futures(datetime.now(UTC).date())
        self.instruments: dict[str, Traded] = {i.name: i for i in traded}
        self.instruments_file = workdir / "instruments.toml"
        self._load_stop = asyncio.Event()
        self._hold = False  # the futures' strategies keep a position open (rollover)
        self._turn = 0  # round-robin over the instances
        # While a disk_full fault runs, every move's first signal goes to the small-disk
        # instance: its spool must reach the full disk's edge within the fault.
        self._focus: str | None = None
        # Switchovers are asked over HTTP and through `pgleader transfer` in turn.
        self._via = cycle(("http", "cli") if seed % 2 else ("cli", "http"))

    # -- set-up ---------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.server.create)
        await migrate(self.server.dsn)
        self.redis.directory.mkdir()
        await asyncio.to_thread(self.redis.start)
        url = await self.broker.start()
        write_instruments_file(self.instruments_file, tuple(self.instruments.values()))
        broker = [
            "--broker", "openalgo", "--instruments-file", str(self.instruments_file),
            "--openalgo-url", url, "--openalgo-api-key", API_KEY, "--openalgo-mode", "analyze",
            # 10% under the fake's limit, which the gateway's pacer keeps 10% under again
            "--openalgo-order-rate", f"{self.broker_rate * 0.9:g}",
        ]  # fmt: skip
        self.disk = SmallDisk(SMALL_DISK_BYTES)
        env = {**ENV, "PGLEADER_REDIS_URL": self.redis.url}
        for name in ("gw1", "gw2", "gw3", NO_LEAD_NODE):
            proxies = [BlackholeProxy(port) for port in self.server.ports]
            for proxy in proxies:
                await proxy.start()
            self.proxies[name] = proxies
            dsn = self.server.dsn_via([proxy.port for proxy in proxies])
            data_dir = self.disk.path if name == DISK_FULL_NODE else self.workdir
            lead = ["--no-lead"] if name == NO_LEAD_NODE else []
            self.nodes[name] = GatewayProcess(
                dsn, name, data_dir, *TIMINGS, *EXTRA, *broker, *lead, log_dir=self.workdir,
                env=env,
            )  # fmt: skip
        await asyncio.gather(*(self.start_node(node) for node in self.nodes.values()))

    async def start_node(self, node: GatewayProcess) -> None:
        """(Re)start an instance; the small disk's limit follows its new process."""
        await node.start()
        if node.instance_id == DISK_FULL_NODE and self.disk is not None:
            assert node.proc is not None
            self.disk.watch(node.proc.pid)

    async def stop(self) -> None:
        try:
            for node in self.nodes.values():
                await node.stop()
            for proxies in self.proxies.values():
                for proxy in proxies:
                    await proxy.stop()
            await self.broker.stop()
            await asyncio.to_thread(self.redis.kill)
        finally:
            await asyncio.to_thread(self.server.close)  # a rebuild under way gives up
            if self._rebuilt is not None:
                await self._rebuilt
            if self.disk is not None:  # whatever failed: a mount would outlive the campaign
                self.disk.close()

    # -- load -----------------------------------------------------------------

    async def load(self, http: aiohttp.ClientSession) -> None:
        """One strategy per instrument (tests.chaos.workload): the busy ones share
        `rate` moves per second (never two of one instrument in a second), the SLOW
        ones move every SLOW_EVERY seconds; round-robin over the instances, a
        reversal's two signals on two of them."""
        traders = [Trader(i) for i in self.instruments.values()]
        busy = sum(t.instrument.name not in SLOW for t in traders)
        spacing = busy / self.rate
        rnd = random.Random(self.seed * 7919)  # its own stream: the fault schedule stays put
        now = time.monotonic()
        due = {id(t): now + rnd.uniform(0, spacing) for t in traders}
        pending: set[asyncio.Task[None]] = set()
        while not self._load_stop.is_set():
            trader = min(traders, key=lambda t: due[id(t)])
            with contextlib.suppress(TimeoutError):
                wait = max(0.0, due[id(trader)] - time.monotonic())
                await asyncio.wait_for(self._load_stop.wait(), wait)
            if self._load_stop.is_set():
                break
            at = await _next_second(trader.last_at)
            move = trader.next(rnd, at, hold=self._hold and bool(trader.instrument.expiries))
            self.history.moves[move.kind] += 1
            first = len(move.bodies) > 1 and rnd.random() < 0.5  # a reversal's entry first
            for n, body in enumerate(reversed(move.bodies) if first else move.bodies):
                node = self.nodes[self._focus] if self._focus and not n else self._next_node()
                if n:  # the second of a reversal: a few ms behind, on another instance
                    await asyncio.sleep(rnd.uniform(0, 0.02))
                task = asyncio.create_task(self._post(http, node, body))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if trader.instrument.name in SLOW:
                due[id(trader)] += rnd.uniform(*SLOW_EVERY)
            else:
                due[id(trader)] += max(1.05, rnd.uniform(0.5, 1.5) * spacing)
        await asyncio.gather(*pending)

    def _next_node(self) -> GatewayProcess:
        names = list(self.nodes)
        self._turn += 1
        return self.nodes[names[self._turn % len(names)]]

    async def _post(
        self,
        http: aiohttp.ClientSession,
        node: GatewayProcess,
        body: dict[str, Any],
        resent: int = 0,
    ) -> None:
        # Not to the small disk's instance while disk_full asks it for `202 spooled`
        # answers (a planted fingerprint's is `200 duplicate`, spooled all the same).
        if self._planting is not None and not resent and node.instance_id != self._focus:
            await self._plant(fingerprint_raw(body))
        sent = time.monotonic()
        status: int | None = None
        answer: dict[str, Any] | None = None
        try:
            async with http.post(f"{node.url}/webhook", json=body) as resp:
                status = resp.status
                answer = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            pass  # refused, reset or timed out: no answer, no promise made
        self.history.requests.append(
            Request(
                sent, node.instance_id, fingerprint_raw(body), status, answer, time.monotonic(),
                resent,
            )
        )  # fmt: skip
        if status is not None and status >= 500 and resent < RESENDS:
            await asyncio.sleep(RESEND_AFTER)  # TradingView's re-send, to whoever is next
            await self._post(http, self._next_node(), body, resent + 1)

    # -- soak -----------------------------------------------------------------

    async def sample(self, every: float = 2.0) -> None:
        """Each instance's RSS and its sessions in pg_stat_activity, every few seconds."""
        import psycopg

        while not self._load_stop.is_set():
            with contextlib.suppress(Exception):
                async with await psycopg.AsyncConnection.connect(
                    self.server.dsn, autocommit=True
                ) as c:
                    cur = await c.execute(
                        "select application_name, coalesce(state, ''), count(*)"
                        " from pg_stat_activity where application_name like '%%:gw_'"
                        " group by 1, 2"
                    )
                    rows = await cur.fetchall()
                    if os.environ.get("CHAOS_TRACE_SESSIONS"):
                        cur = await c.execute(
                            "select application_name, pid, backend_start::time,"
                            " state_change::time, client_port, state"
                            " from pg_stat_activity where application_name like 'gateway-listen%%'"
                        )
                        print(
                            "  sessions",
                            time.strftime("%H:%M:%S"),
                            await cur.fetchall(),
                            flush=True,
                        )
                sessions: dict[str, int] = {}
                for app, _, n in rows:
                    name = app.rsplit(":", 1)[-1]
                    sessions[name] = sessions.get(name, 0) + n
                for name, n in sessions.items():
                    if n > self.history.session_peak.get("sessions", 0):
                        self.history.session_peak = {
                            "instance": name,
                            "sessions": n,
                            "by_application_and_state": sorted(
                                (app, state, k)
                                for app, state, k in rows
                                if app.rsplit(":", 1)[-1] == name
                            ),
                        }
                for name, node in self.nodes.items():
                    if node.proc is not None and node.proc.returncode is None:
                        rss = _rss_kb(node.proc.pid)
                        if rss:
                            self.history.samples.append(
                                (time.monotonic(), name, node.proc.pid, rss, sessions.get(name, 0))
                            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._load_stop.wait(), every)

    # -- faults ---------------------------------------------------------------

    async def _rows(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A query on a connection of its own to the primary of now; [] when the
        database cannot answer (a fault may be under way)."""
        import psycopg

        with contextlib.suppress(Exception):
            async with await psycopg.AsyncConnection.connect(self.server.dsn, autocommit=True) as c:
                cur = await c.execute(query, params)
                return await cur.fetchall()
        return []

    async def leader(self, timeout: float = 30) -> GatewayProcess | None:
        """The instance the database names as leader, if one is alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for (name,) in await self._rows(
                "select leader from pgleader.leader where election = %s", [ELECTION]
            ):
                if self._running(name):
                    return self.nodes[name]
            await asyncio.sleep(0.1)
        return None

    async def inject(self, kind: str, *, last: bool = False) -> None:
        """One fault; `last`: the last of its lane (nothing after it to wait for)."""
        if kind in DB_OUTAGES:
            try:
                await self.db_outage(kind)
            finally:
                async with self._outage_over:
                    self._outages += 1
                    self._outage_over.notify_all()
            return
        if kind in REDIS_FAULTS:
            await self.redis_fault(kind)
            return
        if kind == "rollover":
            await self.rollover()
            return
        if kind in BROKER_FAULTS:
            await self.broker_fault(kind, last=last)
            return
        if kind in TRANSFER_FAULTS:
            await self.transfer(kind)
            return
        if kind == "pause_waiter":
            await self.pause_waiter()
            return
        await self.leader_fault(kind)

    async def db_outage(self, kind: str) -> None:
        """One of DB_OUTAGES, on whichever node is the primary."""
        rnd = self.random
        if kind in ("restart_fast", "restart_immediate"):
            mode = kind.split("_")[1]
            self.history.fault(kind, "postgres")
            await asyncio.to_thread(self.server.restart, mode)
            return
        if kind == "db_down":
            self.history.fault(kind, "postgres")
            await asyncio.to_thread(self.server.stop, "fast")
            await asyncio.sleep(rnd.uniform(2, 4))
            await asyncio.to_thread(self.server.start)
            return
        if kind == "disk_full":
            await self.disk_full()
            return
        if kind == "db_failover":
            await self.db_failover()
            return
        raise ValueError(f"not a database outage: {kind}")

    async def leader_fault(self, kind: str) -> None:
        """kill, sigterm, pause or partition of the leader (skipped without a live one)."""
        rnd = self.random
        target = await self.leader()
        if target is None:
            return
        name = target.instance_id
        self.history.fault(kind, name)
        if kind == "kill":
            target.signal(signal.SIGKILL)
            await target.wait()
            await asyncio.sleep(rnd.uniform(0.5, 2))
            await self.start_node(target)
        elif kind == "sigterm":
            target.signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await target.wait(40)
            await self.start_node(target)
        elif kind == "pause":
            target.signal(signal.SIGSTOP)
            await asyncio.sleep(EVICT_AFTER + rnd.uniform(0.5, 2))
            target.signal(signal.SIGCONT)
        elif kind == "partition":
            for proxy in self.proxies[name]:
                proxy.blackhole()
            await asyncio.sleep(EVICT_AFTER + rnd.uniform(0.5, 3))
            for proxy in self.proxies[name]:
                proxy.heal()

    async def pause_waiter(self) -> None:
        """The leader dies while a follower's process is paused with its lock wait in
        flight: SIGSTOP the eligible follower that has waited longest (first in the
        lock's queue), SIGKILL the leader. The server grants the paused session the lock
        when it waited first, and its claim (the same statement) elects the frozen
        instance; followers evict it as a hung leader once its beat is older than
        evict_after. Another instance must lead while it stays paused (evict_after + 3-5 s;
        the checker's `waiter` rule).
        Skipped without a leader and a waiting follower."""
        found = await self._longest_waiter()
        if found is None:
            print("  pause_waiter skipped: no leader with a follower waiting", flush=True)
            return
        leader, waiter = self.nodes[found[0]], self.nodes[found[1]]
        self.history.fault("pause_waiter", waiter.instance_id, f"then {leader.instance_id} killed")
        paused_at = time.time()
        waiter.signal(signal.SIGSTOP)
        leader.signal(signal.SIGKILL)
        granted = False
        try:
            await leader.wait()
            granted = await self._holds_lock(waiter.instance_id, within=2.0)
            await asyncio.sleep(EVICT_AFTER + self.random.uniform(3, 5))
        finally:
            waiter.signal(signal.SIGCONT)
            self.history.paused_waiters.append(
                PausedWaiter(
                    waiter.instance_id, leader.instance_id, paused_at, time.time(), granted
                )
            )
            await self.start_node(leader)

    async def _longest_waiter(self) -> tuple[str, str] | None:
        """(leader, the live eligible follower whose election session has waited on the
        lock longest), or None."""
        query = (
            "select l.leader, i.instance_id from pgleader.leader l"
            "  join pgleader.instances i on i.election = l.election and i.eligible"
            "   and i.instance_id <> l.leader"
            "  join pg_locks k on k.pid = i.backend_pid and k.locktype = 'advisory'"
            "   and k.objsubid = 2 and not k.granted"
            " where l.election = %s and l.lock_held order by k.waitstart"
        )
        for leader, waiter in await self._rows(query, [ELECTION]):
            if self._running(leader) and self._running(waiter):
                return str(leader), str(waiter)
        return None

    async def _holds_lock(self, instance: str, within: float) -> bool:
        """Whether `instance`'s registered election session is granted the lock within
        `within` seconds."""
        query = (
            "select from pgleader.instances i join pg_locks k on k.pid = i.backend_pid"
            " and k.locktype = 'advisory' and k.objsubid = 2 and k.granted"
            " where i.election = %s and i.instance_id = %s"
        )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if await self._rows(query, [ELECTION, instance]):
                return True
            await asyncio.sleep(0.1)
        return False

    async def db_failover(self) -> None:
        """PostgreSQL fails over: the primary crashes (immediate), after a gap of
        FAILOVER_GAP its synchronous standby is promoted, and a new standby is made
        from the new primary in the background (tests.chaos.database). The instances
        find the new primary through their multi-host DSN by themselves.

        A failover waits first until the standby streams synchronously (the last
        failover's rebuild, or a reconnection after a restart of the primary): a
        standby that lags may lack acknowledged commits, which is not this fault."""
        if self._rebuilt is not None:
            await self._rebuilt
        server = self.server
        if server.standby is None:
            print("  db_failover skipped: the last failover's standby was not rebuilt", flush=True)
            return
        await asyncio.to_thread(server.wait_sync, REBUILD_WAIT)
        gap = self.random.uniform(*FAILOVER_GAP)
        old, new = server.primary.port, server.standby.port
        self.history.fault(
            "db_failover", "postgres", f"primary :{old} crashed, :{new} promoted {gap:.1f} s later"
        )
        await asyncio.to_thread(server.crash_primary)
        crashed = time.time()
        await asyncio.sleep(gap)
        promoting = time.time()
        await asyncio.to_thread(server.promote)
        failover = Failover(crashed, promoting, time.time(), old, new)
        self.history.failovers.append(failover)
        self._rebuilt = asyncio.create_task(self._rebuild(failover))

    async def _rebuild(self, failover: Failover) -> None:
        try:
            failover.rebuilt_s = await asyncio.to_thread(self.server.rebuild, REBUILD_WAIT)
        except Exception as exc:  # the next failover is skipped; the summary says why
            failover.rebuild_error = f"{type(exc).__name__}: {exc}"
        print(
            f"    standby :{failover.old_port} rebuilt from :{failover.new_port}"
            + (f" in {failover.rebuilt_s:.1f} s" if failover.rebuilt_s is not None else "")
            + (f": FAILED {failover.rebuild_error}" if failover.rebuild_error else ""),
            flush=True,
        )

    async def redis_fault(self, kind: str) -> None:
        """The gateways' Redis dies (SIGKILL, restarted empty), pauses (SIGSTOP), or
        holds wrong entries (`redis_garbage`). Redis decides nothing: the checker's
        invariants must hold whatever it does."""
        rnd = self.redis_random
        if kind == "redis_garbage":
            await self.redis_garbage(rnd)
            return
        seconds = rnd.uniform(*REDIS_DOWN)
        if kind == "redis_kill":
            self.history.fault(kind, "redis", f"SIGKILL, restarted empty {seconds:.1f} s later")
            await asyncio.to_thread(self.redis.kill)
            await asyncio.sleep(seconds)
            await asyncio.to_thread(self.redis.start)
        else:
            self.history.fault(kind, "redis", f"SIGSTOP {seconds:.1f} s")
            self.redis.pause()
            await asyncio.sleep(seconds)
            self.redis.resume()

    async def redis_garbage(self, rnd: random.Random) -> None:
        """Every stored fingerprint's entry rewritten (another signal's id, or not an
        id at all), the leader's entry naming an instance that does not exist; then,
        until the next database outage is over (at most PLANT_AT_MOST), each new
        signal's fingerprint planted before it is sent, naming some other signal: in
        the outage the gateways answer it `200 duplicate`, and must still keep
        (spool) and execute it."""
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.redis.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            keys = [key async for key in client.scan_iter(match=f"{FP_KEY}*", count=1000)]
            wrong = json.dumps({"leader": "gw9", "epoch": 1, "url": "http://127.0.0.1:9"})
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    value = rnd.choice((*GARBAGE, str(rnd.randint(1, 10**6))))
                    pipe.set(key, value, keepttl=True)
                pipe.set(LEADER_KEY, wrong, px=60_000)
                await pipe.execute()
            self.history.fault(
                "redis_garbage", "redis", f"{len(keys)} fingerprints rewritten, the leader's"
                " entry wrong; planting fingerprints until a database outage is over",
            )  # fmt: skip
            since = self._outages
            self._planting = client
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PLANT_AT_MOST), self._outage_over:
                    await self._outage_over.wait_for(lambda: self._outages > since)
        except aioredis.RedisError as exc:
            print(f"  redis_garbage skipped: {type(exc).__name__}: {exc}", flush=True)
        finally:
            self._planting = None
            await client.aclose()

    async def _plant(self, fingerprint: str) -> None:
        """Redis holds `fingerprint` as some signal's before it is first sent."""
        value = str(self._plant_ids.randint(1, max(1, len(self.history.requests))))
        with contextlib.suppress(Exception):  # a cache may lose it: nothing rides on it
            async with asyncio.timeout(0.5):
                await self._planting.set(FP_KEY + fingerprint, value, px=60_000)
                self.history.planted.add(fingerprint)

    async def transfer(self, kind: str) -> None:
        """A switchover asked of the leader, over HTTP (POST /coordinator/transfer) and
        through the database (`pgleader transfer`) in turn:

        transfer_live        to a live eligible follower, which must be the next elected;
        transfer_dead        to a follower SIGKILLed just before: refused in one line, or,
                             while the registry still shows it alive, accepted, and then
                             another instance must lead once the bound is over (the killed
                             one restarts after);
        transfer_ineligible  to the --no-lead instance: refused in one line, the
                             leadership unchanged.

        Skipped, as the leader's faults are, when no leader and live follower show up
        in TRANSFER_READY_WAIT. The next election is awaited on LISTEN pgleader_events;
        what came of it goes into the history for the checker (`transfer_promise`)."""
        ready = await self._ready_for_transfer()
        if ready is None:
            print(f"  {kind} skipped: no leader with a live follower", flush=True)
            return
        epoch, leader, followers = ready
        to = NO_LEAD_NODE if kind == "transfer_ineligible" else self.random.choice(followers)
        via = next(self._via)
        self.history.fault(kind, to, f"via {via}, asked of {leader} (epoch {epoch})")
        victim = self.nodes[to] if kind == "transfer_dead" else None
        if victim is not None:
            victim.signal(signal.SIGKILL)
            await victim.wait()
        # the CLI waits for the target's election: a killed one never comes
        until = TRANSFER_WAIT if kind == "transfer_live" else TRANSFER_BOUND
        wait = TRANSFER_WAIT if kind == "transfer_live" else LEADERLESS_AT_MOST
        try:
            async with Elections(self.server.dsn) as elections:
                asked = time.monotonic()
                if via == "http":
                    answer, said = await self._transfer_http(self.nodes[leader], to)
                else:
                    answer, said = await self._transfer_cli(to, until)
                t = Transfer(kind, via, to, leader, epoch, answer, said)
                if answer == "refused":
                    t.after = await self._leadership()
                else:  # accepted, or an answer of another kind: whatever follows is recorded
                    t.waited = wait
                    while elected := await elections.next(asked + wait - time.monotonic()):
                        name, new_epoch, at = elected
                        t.elections.append((name, new_epoch, at - asked))
                        if kind != "transfer_dead" or name != to:
                            break
            self.history.transfer(t)
        finally:
            if victim is not None:
                await self.start_node(victim)

    async def _ready_for_transfer(self) -> tuple[int, str, list[str]] | None:
        """(epoch, leader, its live eligible followers) once the leader holds the lock
        and at least one follower beats on its session of now, else None."""
        query = (
            "select l.epoch, l.leader, array(select i.instance_id from pgleader.instances i"
            "   join pg_stat_activity a on a.pid = i.backend_pid"
            "  where i.election = l.election and i.eligible and not i.is_leader"
            "    and i.instance_id <> l.leader"
            "    and i.last_heartbeat > now() - make_interval(secs => %s)"
            "    and i.last_heartbeat > coalesce((select max(h.released_at)"
            "          from pgleader.leadership_history h"
            "         where h.election = i.election and h.instance_id = i.instance_id),"
            "        '-infinity')"
            "  order by 1)"
            " from pgleader.leader l where l.election = %s and l.lock_held"
        )
        deadline = time.monotonic() + TRANSFER_READY_WAIT
        while time.monotonic() < deadline:
            # beating within half the gateway's live_within: a margin for the request
            for epoch, leader, beating in await self._rows(query, [EVICT_AFTER / 2, ELECTION]):
                followers = [name for name in beating if self._running(name)]
                if self._running(leader) and followers:
                    return int(epoch), str(leader), followers
            await asyncio.sleep(0.1)
        return None

    def _running(self, name: str | None) -> bool:
        node = self.nodes.get(name or "")
        return node is not None and node.proc is not None and node.proc.returncode is None

    async def _leadership(self) -> tuple[int, str | None] | None:
        """The election's epoch and leader (None while nobody holds the lock)."""
        for epoch, leader in await self._rows(
            "select epoch, leader from pgleader.leader where election = %s", [ELECTION]
        ):
            return int(epoch), leader
        return None

    async def _transfer_http(self, leader: GatewayProcess, to: str) -> tuple[str, str]:
        """POST /coordinator/transfer to the leader's operator listener: ("accepted" |
        "refused" | "<status> <answer's status>" | "no answer", what it said)."""
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        timeout = aiohttp.ClientTimeout(total=TRANSFER_WAIT)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.post(
                    f"{leader.operator_url}/coordinator/transfer", json={"to": to}, headers=headers
                ) as resp,
            ):
                status, body = resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            return "no answer", f"{type(exc).__name__}: {exc}"
        if not isinstance(body, dict):
            return f"{status} (not a JSON object)", str(body)
        if status == 200 and body.get("status") == "transferred":
            return "accepted", json.dumps(body)
        if status == 409 and body.get("status") == "refused":
            return "refused", str(body.get("error"))
        return f"{status} {body.get('status')}", str(body.get("error"))

    async def _transfer_cli(self, to: str, until: float) -> tuple[str, str]:
        """`pgleader transfer --to ID`, waiting `until` seconds for the target's
        election: ("accepted" | "refused" | "exit N", what it said)."""
        code, out, err = await pgleader_cli(
            "transfer", "--to", to, "--dsn", self.server.dsn, "--election", ELECTION,
            "--bound", f"{TRANSFER_BOUND:g}", "--timeout", f"{until:g}", timeout=until + 60,
        )  # fmt: skip
        err = err.strip()
        if code == 0:
            return "accepted", out.strip()
        if err.startswith(CLI_REFUSED):
            return "refused", err.removeprefix(CLI_REFUSED)
        if code == 1 and err.startswith(f"pgleader transfer: {to} did not lead within"):
            return "accepted", err  # accepted; the target never took the lock
        return f"exit {code}", err or out.strip()

    async def broker_fault(self, kind: str, *, last: bool = False) -> None:
        """The fake OpenAlgo misbehaves for a while, or for the next few calls (then
        until those calls came, at most FAULT_CALLS_WAIT seconds, or
        SLOW_FAULT_CALLS_WAIT for a seldom-traded instrument's).

        Latency stays under the settle time (less the claim-to-send time): an order
        answered after the client gave up is applied before the executor asks the
        broker what became of it. Longer, no target order is safe (a late one could
        undo the next order's move), and the executor's position check would put
        every later signal of that instrument in doubt. A 5xx goes to one of the
        seldom-traded instruments two times in three (workload.SLOW: settling finds
        no other order near it), to any order otherwise. After a 403 the lane waits
        out the executor's hold (AFTER_403) unless it is the lane's `last`, or the
        next broker faults would meet no order."""
        rnd = self.broker_random
        broker = self.broker
        calls = rnd.randint(1, 3)
        symbol: str | None = None  # the 5xx's, when it aims at one instrument
        if kind == "broker_pause":
            seconds = rnd.uniform(1.0, 4.0)
            self.history.fault(kind, "openalgo", f"SIGSTOP {seconds:.1f} s")
            broker.pause()
            await asyncio.sleep(seconds)
            broker.resume()
            return
        if kind == "broker_403":
            seconds = rnd.uniform(1.0, 3.0)
            self.history.fault(kind, "openalgo", f"session expired {seconds:.1f} s")
            await broker.faults(unauthorised=True)
            await asyncio.sleep(seconds)
            await broker.faults(clear=True)
            if not last:
                await asyncio.sleep(AFTER_403)
            return
        if kind == "broker_open":
            # Filled before the executor settles an order it could not confirm in time.
            fill_after = rnd.uniform(0.2, BROKER_SETTLE - 1.0)
            seconds = rnd.uniform(2.0, 5.0)
            self.history.fault(
                kind, "openalgo", f"orders open {fill_after:.1f} s, for {seconds:.1f} s"
            )
            await broker.faults(fill_after=fill_after)
            await asyncio.sleep(seconds)
            await broker.faults(fill_after=0.0)
            return
        if kind == "broker_reject":
            self.history.fault(kind, "openalgo", f"reject {calls} order(s) after their orderid")
            await broker.faults(rms_reject=calls)
        elif kind == "broker_latency":
            latency = rnd.uniform(BROKER_TIMEOUT + 0.1, BROKER_SETTLE - 0.6)
            self.history.fault(kind, "openalgo", f"{latency:.1f} s on {calls} order call(s)")
            await broker.faults(latency=latency, calls=calls)
        elif kind == "broker_5xx":
            status = rnd.choice((500, 502, 503))
            seldom = [self.instruments[name] for name in SLOW if name in self.instruments]
            target = rnd.choice(seldom) if seldom and rnd.random() < 2 / 3 else None
            symbol = target.symbol if target else None
            calls = 1 if target else calls
            where = f"{target.name}'s next {calls}" if target else f"{calls}"
            self.history.fault(kind, "openalgo", f"{status} on {where} order call(s)")
            await broker.faults(error_status=status, calls=calls, symbol=symbol)
        elif kind == "broker_drop":
            self.history.fault(kind, "openalgo", f"apply then drop {calls} order call(s)")
            await broker.faults(drop_after_apply=True, calls=calls)
        elif kind == "broker_429":
            burst = rnd.randint(5, 25)
            self.history.fault(kind, "openalgo", f"429 on the next {burst} calls")
            await broker.faults(rate_limited=burst)
        wait = SLOW_FAULT_CALLS_WAIT if symbol is not None else FAULT_CALLS_WAIT
        deadline = time.monotonic() + wait
        await asyncio.sleep(1.0)
        while time.monotonic() < deadline:
            left = (await broker.state())["faults"]
            if not left["rate_limited"] and not left["calls"] and not left["rms_reject"]:
                break
            await asyncio.sleep(0.5)
        await broker.faults(clear=True)

    async def rollover(self) -> None:
        """The futures' roll falls due: their instruments file is rewritten with
        ROLL_DAYS_BEFORE (today inside the near contract's roll window) and the
        instances restart on it one by one, the leader last, as a deploy would: the
        leadership passes to an instance that reads the new file, whose rollover job
        rolls the open positions while the other faults go on.

        A flat future has nothing to roll, and one the new leader finds flat opens
        again in the next contract: so the futures' strategies hold (only enter) from
        before the file changes, until each future is open in its near contract with
        no signal of it from before the hold waiting (an exit), at most HOLD_WAIT, and
        after the restarts until none is left in its near contract, at most ROLL_WAIT."""
        self._hold = True
        since = datetime.now(UTC)  # the host's clock, as the database's received_at
        try:
            everyone = len(self._futures())
            held = await self._until_futures(
                lambda near, waiting: near == everyone and waiting == 0, since, HOLD_WAIT
            )
            write_instruments_file(
                self.instruments_file,
                tuple(self.instruments.values()),
                roll_days_before=ROLL_DAYS_BEFORE,
            )
            leader = await self.leader(timeout=5)
            followers = [node for node in self.nodes.values() if node is not leader]
            late = "" if held else f" (the futures not all held after {HOLD_WAIT:g} s)"
            self.history.fault("rollover", "all", f"roll_days_before = {ROLL_DAYS_BEFORE}{late}")
            for node in followers + ([leader] if leader else []):
                await node.stop()
                await self.start_node(node)
            await self._until_futures(lambda near, waiting: near == 0, since, ROLL_WAIT)
        finally:
            self._hold = False

    def _futures(self) -> list[Traded]:
        return [i for i in self.instruments.values() if i.expiries]

    async def _until_futures(
        self, done: Callable[[int, int], bool], since: datetime, at_most: float
    ) -> bool:
        """Wait until `done(near, waiting)` (whether it came): how many futures are open
        in their near contract, how many of their signals received before `since` are
        pending or executing."""
        import psycopg

        futures = self._futures()
        near = [f"{i.exchange}:{i.contracts[0]}:{i.product}" for i in futures]
        query = (
            "select (select count(*) from gateway.open_contracts where contract = any(%s)),"
            " (select count(*) from gateway.signals"
            "   where instrument = any(%s) and status in ('pending', 'executing')"
            "     and received_at < %s)"
        )
        deadline = time.monotonic() + at_most
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                async with await psycopg.AsyncConnection.connect(
                    self.server.dsn, autocommit=True
                ) as c:
                    cur = await c.execute(query, [near, [i.name for i in futures], since])
                    row = await cur.fetchone()
                    if row and done(*row):
                        return True
            await asyncio.sleep(0.2)
        return False

    async def disk_full(self) -> None:
        """PostgreSQL down while one instance's data directory fills up, then frees.

        The database goes first and the disk fills once the instance has spooled a
        signal, so its spool file ends part way through a block: the next appends
        fit, or are cut short crossing into a block the full disk cannot give. Each
        signal it cannot spool whole must be answered 503 (TradingView retries 5xx);
        once the disk is freed, still in the outage, it spools (202) again. Each
        phase lasts until the instance has given the answer it is there to provoke
        (bounded): an answer in an outage waits for the pool's timeout first.
        """
        assert self.disk is not None
        rnd = self.random
        self.history.fault("disk_full", DISK_FULL_NODE)
        self._focus = DISK_FULL_NODE
        try:
            await self._disk_full(rnd)
        finally:
            self._focus = None

    async def _disk_full(self, rnd: random.Random) -> None:
        assert self.disk is not None
        down = time.monotonic()
        await asyncio.to_thread(self.server.stop, "fast")
        await self._answered(down, "202 spooled", 1, at_least=rnd.uniform(0.3, 0.8), at_most=4)
        await asyncio.to_thread(self.disk.fill, DISK_FULL_LEAVE)
        filled = time.monotonic()
        await self._answered(filled, "503", 1, at_least=rnd.uniform(1.5, 2.5), at_most=8)
        await asyncio.to_thread(self.disk.free)
        freed = time.monotonic()
        await self._answered(freed, "202 spooled", 2, at_least=rnd.uniform(1.0, 2.0), at_most=6)
        await asyncio.to_thread(self.server.start)
        self.history.disk_full.append((down, filled, freed, time.monotonic()))

    async def _answered(
        self, since: float, answer: str, n: int, *, at_least: float, at_most: float
    ) -> None:
        """Wait `at_least` seconds, then until the small-disk instance has given `n`
        answers starting with `answer` (e.g. "503", "202 spooled") since `since`;
        `at_most` seconds from `since` in all."""

        def given() -> int:
            total = 0
            for r in reversed(self.history.requests):  # in the order answered
                if r.answered_at < since:
                    break
                if r.instance == DISK_FULL_NODE and answer_of(r).startswith(answer):
                    total += 1
            return total

        await asyncio.sleep(at_least)
        while time.monotonic() < since + at_most:
            if given() >= n:
                return
            await asyncio.sleep(0.1)

    async def faults(self, kinds: list[str]) -> None:
        """Three lanes side by side, each one fault at a time: the instances' and the
        database's, the broker's, and Redis's (their faults combine, as they would).
        Redis's few faults are spread over the round, to meet the database's outages."""

        async def lane(kinds: list[str], rnd: random.Random, most: float = 2.5) -> None:
            for n, kind in enumerate(kinds, 1):
                await asyncio.sleep(rnd.uniform(1.0, most))
                await self.inject(kind, last=n == len(kinds))

        redis = [k for k in kinds if k in REDIS_FAULTS]
        await asyncio.gather(
            lane([k for k in kinds if k not in BROKER_FAULTS + REDIS_FAULTS], self.random),
            lane([k for k in kinds if k in BROKER_FAULTS], self.broker_random),
            lane(redis, self.redis_random, max(2.5, self.duration / (len(redis) + 1))),
        )

    def schedule(self, count: int) -> list[str]:
        """Every fault kind at least once when count allows (else `count` different
        ones), then random ones but rollover (one roll a round), shuffled; one
        broker_403 last: the executor's hold of every send after it (AFTER_403) then
        overlaps the other lane's faults instead of delaying the broker faults after
        it, which would meet no order."""
        again = [kind for kind in FAULTS if kind != "rollover"]
        kinds = self.random.sample(FAULTS, min(count, len(FAULTS))) + [
            self.random.choice(again) for _ in range(count - len(FAULTS))
        ]
        self.random.shuffle(kinds)
        if "broker_403" in kinds:
            kinds.remove("broker_403")
            kinds.append("broker_403")
        return kinds

    # -- the run --------------------------------------------------------------

    async def run(self, fault_count: int, quiet: float = QUIET) -> dict[str, Any]:
        from tests.chaos.checker import check

        kinds = self.schedule(fault_count)
        print(f"chaos seed={self.seed} faults={kinds}", flush=True)
        await self.start()
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            load = asyncio.create_task(self.load(http))
            sampler = asyncio.create_task(self.sample())
            started = time.monotonic()
            try:
                await self.faults(kinds)
                await asyncio.sleep(max(0.0, self.duration - (time.monotonic() - started)))
            finally:  # a fault that raised still lets the load finish on an open session
                self._load_stop.set()
                await load
                await sampler
        await self.heal_all()
        return await check(self, quiet)

    async def heal_all(self) -> None:
        self.broker.resume()
        await self.broker.faults(clear=True)
        if self.disk is not None:
            await asyncio.to_thread(self.disk.free)
        for proxies in self.proxies.values():
            for proxy in proxies:
                proxy.heal()
        if self.redis.proc is None or self.redis.proc.poll() is not None:
            await asyncio.to_thread(self.redis.start)
        else:
            self.redis.resume()
        if not await asyncio.to_thread(self.server.is_running):
            await asyncio.to_thread(self.server.start)
        if self._rebuilt is not None:  # the summary reports the last failover's rebuild too
            await self._rebuilt
        for node in self.nodes.values():
            node.signal(signal.SIGCONT)
            if node.proc is None or node.proc.returncode is not None:
                await self.start_node(node)


class Elections:
    """The gateway election's `elected` announcements (LISTEN pgleader_events) from the
    moment it is entered: a switchover's outcome is awaited, never polled for."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Any = None

    async def __aenter__(self) -> Elections:
        import psycopg

        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        await self.conn.execute("listen pgleader_events")  # EVENTS_CHANNEL
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def next(self, timeout: float) -> tuple[str, int, float] | None:
        """The next instance elected, its epoch and when (time.monotonic()), or None
        when none was within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            async with contextlib.aclosing(self.conn.notifies(timeout=left)) as notes:
                async for note in notes:
                    event = parse_event(note.payload)
                    if event.get("event") == "elected" and event.get("election") == ELECTION:
                        return str(event["leader"]), int(event["epoch"]), time.monotonic()
        return None


async def _next_second(last: datetime | None) -> datetime:
    """Now, in a later second than `last` (waiting for it if need be)."""
    while True:
        now = datetime.now(UTC)
        if last is None or now.replace(microsecond=0) > last.replace(microsecond=0):
            return now
        await asyncio.sleep(1.0 - now.microsecond / 1e6 + 0.01)


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _disk_full_row(d: dict[str, Any]) -> str:
    def answers(phase: dict[str, int]) -> str:
        return ", ".join(f"{k} x{v}" for k, v in sorted(phase.items())) or "nothing"

    return (
        f"disk_full x{d['faults']} on {DISK_FULL_NODE} ({d['mode']}): while full {answers(d['full'])};"
        f" once freed {answers(d['freed'])}"
    )


def _rollover_rows(rollovers: dict[str, Any]) -> list[str]:
    def step(s: dict[str, Any]) -> str:
        booked = ", ".join(f"{k} x{v}" for k, v in sorted(s["booked"].items())) or "none"
        return f"booked {booked}, broker fills {s['fills']}"

    states = ", ".join(f"{k} x{v}" for k, v in sorted(rollovers["states"].items()))
    rows = [f"  rollovers {len(rollovers['rolls'])}" + (f" ({states}):" if states else "")]
    for r in rollovers["rolls"]:
        took = f" in {r['seconds']:.1f} s" if r["seconds"] is not None else ""
        rows += [
            f"    roll {r['id']} {r['instrument']} {r['side']} {r['lots']} lots {r['from']} ->"
            f" {r['to']}: {r['state']}{took}; signals waited behind it {r['waited']},"
            f" claimed during it {r['claimed_during']}",
            f"      exit {step(r['exit'])}; entry {step(r['entry'])}",
        ]
    return rows


def _transfer_rows(transfers: list[dict[str, Any]]) -> list[str]:
    rows = [f"  transfers {len(transfers)}" + (":" if transfers else "")]
    for t in transfers:
        rows.append(
            f"    {t['kind']} {t['leader']} -> {t['to']} via {t['via']}:"
            f" {describe_transfer(Transfer(**t))}"
        )
    return rows


def _failover_rows(failovers: list[dict[str, Any]]) -> list[str]:
    def s(value: float | None) -> str:
        return "never" if value is None else f"{value:.2f} s"

    rows = [f"  db_failovers {len(failovers)}" + (":" if failovers else "")]
    for f in failovers:
        rebuilt = f"FAILED: {f['rebuild_error'][:160]}" if f["rebuild_error"] else s(f["rebuilt_s"])
        rows.append(
            f"    crash -> promote {f['gap_s']:.2f} s, promote took {f['promote_s']:.2f} s;"
            f" promote -> elected {s(f['promote_to_elected_s'])} ({f['leader']}, epoch"
            f" {f['epoch_before']} -> {f['epoch']}), -> first executed"
            f" {s(f['promote_to_first_executed_s'])}; standby rebuilt {rebuilt}"
        )
    return rows


def _waiter_rows(waits: list[dict[str, Any]]) -> list[str]:
    rows = [f"  paused waiters {len(waits)}" + (":" if waits else "")]
    for w in waits:
        elected = (
            f"{w['elected']} elected {w['pause_to_elected_s']:.2f} s after the pause"
            if w["elected"]
            else "nobody elected"
        )
        granted = " (its session granted the lock)" if w["granted_the_lock"] else ""
        if w.get("paused_instance_epoch") is not None:
            granted = f" (its session granted the lock, claimed epoch {w['paused_instance_epoch']})"
        rows.append(
            f"    {w['waiter']} paused{granted}, {w['leader_killed']} killed: {elected};"
            f" resumed after {w['paused_s']:.1f} s"
        )
    return rows


def _redis_row(r: dict[str, Any]) -> str:
    faults = ", ".join(f"{k} x{v}" for k, v in sorted(r["faults"].items())) or "none"
    ended = ", ".join(f"{k} x{v}" for k, v in sorted(r["ended"].items())) or "none in the inbox"
    return (
        f"  redis faults {faults}; fingerprints planted before their signal was sent"
        f" {r['planted']}, answered 200 duplicate from Redis {len(r['answered_duplicate'])}"
        f" (in the inbox: {ended})"
    )


def _no_lead_row(n: dict[str, Any]) -> str:
    led = f"led epochs {n['led']}" if n["led"] else "never led"
    return (
        f"  no-lead {n['instance']}: answered 2xx {n['answered_2xx']} of {n['requests']}"
        f" requests, stored {n['stored']} signals ({n['executed']} executed by the leaders);"
        f" {led}, claimed {n['claimed']} signals, booked {n['ordered']} orders"
    )


def summary(result: dict[str, Any]) -> str:
    faults = Counter(kind for _, kind, _ in result["faults"])
    broker = result["broker"]
    moves = result["moves"]
    rows = [
        f"seed {result['seed']}: {'PASS' if not result['violations'] else 'FAIL'}",
        f"  requests {result['requests']} ({result['resent']} re-sent after a 5xx),"
        f" signals answered 2xx {result['accepted']}, no answer {result['unanswered']}",
        "  answers: " + ", ".join(f"{k} x{v}" for k, v in sorted(result["answers"].items())),
        "  workload: " + ", ".join(f"{k} x{moves.get(k, 0)}" for k in MOVES),
        f"  2xx signals executed {result['executed']}, terminal with alert {result['terminal']};"
        f" inbox {result['inbox']} (a signal stored before its instance died unanswered still runs)",
        "  inbox by status: "
        + ", ".join(f"{k} x{v}" for k, v in sorted(result["statuses"].items())),
        *(f"    {status} x{n}: {why}" for status, why, n in result["refusals"]),
        "  orders by outcome: " + ", ".join(f"{k} x{v}" for k, v in result["outcomes"].items()),
        f"  epochs {result['epochs']}, orders booked {result['orders']}, broker fills"
        f" {broker['fills']}, broker answers "
        + ", ".join(f"{k} x{v}" for k, v in sorted(broker["answers"].items())),
        "  faults: " + ", ".join(f"{k} x{v}" for k, v in sorted(faults.items())),
        *_transfer_rows(result["transfers"]),
        *_waiter_rows(result["paused_waiters"]),
        *_failover_rows(result["failovers"]),
        _redis_row(result["redis"]),
        _no_lead_row(result["no_lead"]),
        f"  202 spooled answers {result['spooled_answers']}, each checked in the inbox;"
        f" spool lines quarantined {result['quarantined']}",
        f"  {_disk_full_row(result['disk_full'])}",
        f"  broker book vs ledger ({broker['both_ways']}/{len(broker['instruments'])} instruments"
        " held both long and short at the broker):",
    ]
    for name, i in broker["instruments"].items():
        rows.append(
            f"    {name:12} ledger {i['ledger']:>6} broker {i['broker']:>6} {i['position']:18}"
            f" max |position| {i['max_abs']:>5} <= {i['bound']:>5}; fills {i['fills']:>3}"
            f" of {i['orders']:>3} orders; in_doubt {i['in_doubt']}"
        )
    in_doubt = broker["in_doubt"]
    rows.append(
        f"  in_doubt {len(in_doubt)} ({sum(a for _, _, a, _ in in_doubt)} with an alert)"
        + (":" if in_doubt else "")
    )
    rows += [f"    signal {sid} {name}: {detail[:160]}" for sid, name, _, detail in in_doubt[:20]]
    if len(in_doubt) > 20:
        rows.append(f"    ... and {len(in_doubt) - 20} more")
    rows += _rollover_rows(result["rollovers"])
    rows += [
        "  invariants: " + ", ".join(result["invariants"]),
        f"  soak: RSS per instance {result['soak']['rss_mb']} MB (first -> last -> max of the"
        f" longest-lived process), sessions per instance max {result['soak']['max_sessions']}",
    ]
    rows += [f"  VIOLATION {v}" for v in result["violations"]]
    return "\n".join(rows)


async def campaign(
    seed: int, duration: float, faults: int, rate: float = 5.0, *, broker_rate: int = 10
) -> dict[str, Any]:
    """One round: `rate` signals per second (about) for `duration` seconds, `faults`
    faults; `broker_rate` the fake OpenAlgo's smart orders per second (its default)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"pgleader-chaos-{seed}-"))
    os.chmod(workdir, 0o755)
    c = Campaign(seed, duration, rate, workdir, broker_rate=broker_rate)
    try:
        result = await c.run(faults)
        result["finished_at"] = datetime.now(UTC).isoformat()
        return result
    finally:
        await c.stop()
        if not os.environ.get("CHAOS_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
