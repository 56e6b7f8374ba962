"""The leader's periodic jobs: run only while leading, scheduled from the database.

Register jobs with a `JobRunner` tied to an `Elector`. When the instance is
elected the runner writes their schedules (fenced) and starts each job whose
time has come by the table `pgleader.jobs`; when it is demoted every run is
cancelled at once. The schedule is in the database, not in memory, so a new
leader knows what is due: a run its predecessor missed or left half done is due
at once, and a run that started under any leader is not started again within its
interval (riverqueue/river#791 is the failure this avoids). A job that raises is
recorded, retried with backoff and reported after `alert_after` failures in a
row; it never stops the other jobs nor the elector. The loop itself retries
whatever fails (a database outage included) for as long as it leads, so a
leader whose jobs failed to start does not stay half-broken (river#1161).

A job is ``async def job(run: JobRun) -> str | None``: it fences its writes with
``run.epoch`` (``await run.fence(conn)`` in a transaction, or a statement under
``run.fenced()``), and returns a one-line summary for the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import time as clock_time
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from psycopg import AsyncConnection

from pgleader.election import Elector, Transition
from pgleader.errors import Fenced, NotLeader, backoff, first_line
from pgleader.fencing import check_epoch, fenced_statement
from pgleader.queries import QUERIES

__all__ = ["Job", "JobRun", "JobRunner"]

log = structlog.get_logger("pgleader.jobs")

_REGISTER = QUERIES["register_job"]
_DUE = QUERIES["due_jobs"]
_START = QUERIES["start_job"]
_FINISH = QUERIES["finish_job"]
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")

Outcome = Literal["succeeded", "failed", "timed_out"]


class ConnectionSource(Protocol):
    """Where the runner gets its connections: a psycopg_pool pool will do."""

    def connection(self) -> AbstractAsyncContextManager[AsyncConnection[Any]]: ...


@dataclass(frozen=True, slots=True)
class JobRun:
    """One run of a job: the epoch it runs under, and the fence for its writes."""

    job: str
    election: str
    epoch: int
    instance_id: str

    async def fence(self, conn: AsyncConnection[Any]) -> None:
        """Inside the caller's transaction: raise Fenced unless this run's epoch is current."""
        await check_epoch(conn, self.election, self.epoch)

    @contextlib.contextmanager
    def fenced(self) -> Iterator[None]:
        """Around a statement that calls pgleader.check_epoch(election, epoch) itself."""
        with fenced_statement(self.election, self.epoch):
            yield


@dataclass(frozen=True, slots=True)
class Job:
    """A periodic job: every `every` seconds, or daily at `daily` in `timezone`."""

    name: str
    func: Callable[[JobRun], Awaitable[str | None]]
    every: float | None = None
    daily: clock_time | None = None
    timezone: str = "UTC"
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"job name {self.name!r}: lower case letters, digits, - and _")
        if (self.every is None) == (self.daily is None):
            raise ValueError(f"job {self.name}: give exactly one of every= and daily=")
        if self.every is not None and self.every <= 0:
            raise ValueError(f"job {self.name}: every must be positive")
        if self.timeout <= 0:
            raise ValueError(f"job {self.name}: timeout must be positive")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"job {self.name}: unknown time zone {self.timezone!r}") from None


class _JobTimeout(Exception):
    """A TimeoutError the job raised itself: a failure, not the runner's timeout."""


@dataclass(slots=True)
class _JobStats:
    runs: dict[str, int] = field(default_factory=dict)  # outcome -> runs by this instance
    last_duration: float | None = None
    since_success: float | None = None  # as of `read_at` (monotonic), by the database
    read_at: float = 0.0


class JobRunner:
    """Runs `jobs` while `elector` leads. `on_failure(job, failures, error)` is
    called (its errors logged, never raised) when a job has failed
    `alert_after` times in a row, and again at every further multiple."""

    def __init__(
        self,
        pool: ConnectionSource,
        elector: Elector,
        jobs: Sequence[Job],
        *,
        poll: float = 1.0,
        retry_base: float = 5.0,
        alert_after: int = 3,
        on_failure: Callable[[str, int, str], Awaitable[None]] | None = None,
    ) -> None:
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise ValueError("two jobs have the same name")
        self.pool = pool
        self.elector = elector
        self.jobs = {job.name: job for job in jobs}
        self.poll = poll
        self.retry_base = retry_base
        self.alert_after = alert_after
        self.on_failure = on_failure
        self._lead_task: asyncio.Task[None] | None = None
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stats = {name: _JobStats() for name in self.jobs}
        self._log = log.bind(election=elector.election, instance=elector.instance_id)
        elector.on_transition(self._on_transition)

    # -- public ----------------------------------------------------------------

    def wake(self) -> None:
        """Look for due jobs now (after a manual request written to the database)."""
        self._wake.set()

    def running(self) -> list[str]:
        return sorted(name for name, task in self._runs.items() if not task.done())

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per job: runs by outcome (this instance's), the last run's duration, and
        seconds since the last success (None: never, or not read yet)."""
        now = time.monotonic()
        return {
            name: {
                "runs": dict(s.runs),
                "last_duration": s.last_duration,
                "since_success": None
                if s.since_success is None
                else s.since_success + (now - s.read_at),
            }
            for name, s in self._stats.items()
        }

    async def refresh(self) -> None:
        """Read every job's time since its last success (a follower's figures for
        its metrics; the leader's loop reads them as it goes)."""
        async with self.pool.connection() as conn:
            await self._read_due(conn, epoch=-1)

    async def stop(self) -> None:
        self._stop_leading()
        tasks = [t for t in (self._lead_task, *self._runs.values()) if t is not None]
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- leading -----------------------------------------------------------------

    def _on_transition(self, t: Transition) -> None:
        self._stop_leading()
        if t.kind == "elected" and self.jobs:
            self._lead_task = asyncio.create_task(self._lead(t.epoch), name="pgleader-jobs")

    def _stop_leading(self) -> None:
        """Demoted: cancel the loop and every run at once (their writes are fenced anyway)."""
        if self._lead_task is not None:
            self._lead_task.cancel()
            self._lead_task = None
        for task in self._runs.values():
            task.cancel()

    async def _lead(self, epoch: int) -> None:
        registered = False
        failures = 0
        while self.elector.epoch == epoch:
            try:
                async with self.pool.connection() as conn:
                    if not registered:
                        await self._register(conn, epoch)
                        registered = True
                    due, wait = await self._read_due(conn, epoch)
                    for name in due:
                        running = self._runs.get(name)
                        idle = running is None or running.done()
                        if idle and await self._start(conn, epoch, name):
                            self._runs[name] = asyncio.create_task(
                                self._run(self.jobs[name], epoch), name=f"pgleader-job:{name}"
                            )
                failures = 0
            except (Fenced, NotLeader):
                return  # demoted: the transition cancels the runs
            except Exception as exc:  # an outage, or worse: retry while leading
                failures += 1
                wait = backoff(failures, base=self.poll, cap=30.0, jitter=0.2)
                self._log.warning("job runner: cannot read the schedule; will retry",
                                  error=first_line(exc), retry_in=round(wait, 2))  # fmt: skip
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, min(wait, self.poll))):
                    await self._wake.wait()

    async def _register(self, conn: AsyncConnection[Any], epoch: int) -> None:
        election = self.elector.election
        for job in self.jobs.values():
            with fenced_statement(election, epoch):
                await conn.execute(
                    _REGISTER,
                    [election, epoch, job.name, job.every, job.daily, job.timezone, job.timeout],
                )

    async def _read_due(self, conn: AsyncConnection[Any], epoch: int) -> tuple[list[str], float]:
        cur = await conn.execute(
            _DUE, {"election": self.elector.election, "epoch": epoch, "names": list(self.jobs)}
        )
        due, wait = [], self.poll
        now = time.monotonic()
        for name, is_due, due_in, since_success in await cur.fetchall():
            stats = self._stats[name]
            stats.since_success, stats.read_at = since_success, now
            if is_due:
                due.append(name)
            else:
                wait = min(wait, due_in)
        return due, wait

    async def _start(self, conn: AsyncConnection[Any], epoch: int, name: str) -> bool:
        election = self.elector.election
        with fenced_statement(election, epoch):
            cur = await conn.execute(_START, [election, epoch, self.elector.instance_id, name])
            row = await cur.fetchone()
        return bool(row and row[0])

    async def _run(self, job: Job, epoch: int) -> None:
        run = JobRun(job.name, self.elector.election, epoch, self.elector.instance_id)
        started = time.monotonic()
        outcome: Outcome
        try:
            async with asyncio.timeout(job.timeout) as deadline:
                try:
                    result = await job.func(run)
                except TimeoutError as exc:  # the job's own (ours cancels it instead)
                    if deadline.expired():
                        raise
                    raise _JobTimeout(first_line(exc) or "TimeoutError") from None
            outcome, text = "succeeded", result or ""
        except TimeoutError:
            outcome, text = "timed_out", f"did not finish within {job.timeout:g} s"
        except (Fenced, NotLeader) as exc:
            self._log.warning("job fenced: a newer leader runs it", job=job.name, error=str(exc))
            self._forget(job.name)
            return
        except asyncio.CancelledError:
            self._forget(job.name)
            raise
        except Exception as exc:  # a job's bug must not reach the runner
            outcome, text = "failed", first_line(exc) or type(exc).__name__
            self._log.exception("job failed", job=job.name)
        duration = time.monotonic() - started
        stats = self._stats[job.name]
        stats.runs[outcome] = stats.runs.get(outcome, 0) + 1
        stats.last_duration = duration
        if outcome == "succeeded":
            stats.since_success, stats.read_at = 0.0, time.monotonic()
        try:
            await self._finish(run, outcome, text, duration)
        finally:
            self._forget(job.name)
            self._wake.set()  # a failure's retry time, or a request that came meanwhile

    def _forget(self, name: str) -> None:
        """This task's run is over (a newer leadership's run of the job may be on)."""
        if self._runs.get(name) is asyncio.current_task():
            del self._runs[name]

    async def _finish(self, run: JobRun, outcome: Outcome, text: str, duration: float) -> None:
        """Record the run (retrying through a short outage while still leading)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self.pool.connection() as conn:
                    with run.fenced():
                        cur = await conn.execute(
                            _FINISH,
                            [
                                run.election,
                                run.epoch,
                                run.job,
                                outcome,
                                text,
                                duration,
                                self.retry_base,
                            ],
                        )
                    row = await cur.fetchone()
                break
            except (Fenced, NotLeader):
                return
            except Exception as exc:
                if self.elector.epoch != run.epoch or attempt >= 5:
                    self._log.error("job run not recorded", job=run.job, error=first_line(exc))
                    return
                await asyncio.sleep(backoff(attempt, base=0.2, cap=2.0, jitter=0.2))
        failures = int(row[0]) if row else 0
        log_fields = {"job": run.job, "outcome": outcome, "duration_s": round(duration, 3)}
        if outcome == "succeeded":
            self._log.info("job ran", result=text, **log_fields)
            return
        self._log.error("job did not succeed", failures=failures, error=text, **log_fields)
        if self.on_failure is not None and failures and failures % self.alert_after == 0:
            try:
                await self.on_failure(run.job, failures, text)
            except Exception:  # user code: reported, never trusted
                self._log.exception("job failure callback failed", job=run.job)
