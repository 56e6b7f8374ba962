"""The leader's periodic jobs (pgleader/jobs.py) against a real PostgreSQL: they run
only while leading, their schedule lives in the database, and a demoted run is fenced."""

from __future__ import annotations

import asyncio
import json
import time as clock
from collections.abc import AsyncIterator, Callable
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
import structlog
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from pgleader import Elector, Fenced, Timings
from pgleader.cli import main
from pgleader.jobs import Job, JobRun, JobRunner
from pgleader.queries import QUERIES

# A lease well above the heartbeat: the suite shares two cores with other work.
FAST = Timings(heartbeat=0.2, lease=1.0, evict_after=2.0)
IST = ZoneInfo("Asia/Kolkata")


@pytest.fixture
async def start(dsn: str) -> AsyncIterator[Callable[..., Any]]:
    """start(instance, jobs, election=..., lead=True, **runner options) -> (elector, runner),
    each runner on a real pool of its own; all stopped at the end, no loop errors left."""
    made: list[tuple[AsyncConnectionPool, Elector, JobRunner]] = []
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))

    async def make(
        instance: str, jobs: list[Job], *, election: str = "main", lead: bool = True, **options: Any
    ) -> tuple[Elector, JobRunner]:
        pool = AsyncConnectionPool(
            dsn, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
        )
        await pool.open()
        elector = Elector(dsn, election, instance_id=instance, timings=FAST, resign_cooldown=0.05)
        runner = JobRunner(pool, elector, jobs, **{"poll": 0.05, "retry_base": 0.05, **options})
        made.append((pool, elector, runner))
        await elector.start()
        if lead:
            await elector.wait_for_leadership(10)
        return elector, runner

    yield make
    for pool, elector, runner in reversed(made):
        await elector.stop()
        await runner.stop()
        await pool.close()
    assert loop_errors == []


async def until(
    db: psycopg.AsyncConnection[Any], job: str, check: Callable[[dict[str, Any]], bool],
    election: str = "main", timeout: float = 10.0,
) -> dict[str, Any]:  # fmt: skip
    """The job's row of pgleader.jobs once `check` holds (polled: an "eventually")."""
    deadline = clock.monotonic() + timeout
    while True:
        cur = db.cursor(row_factory=dict_row)
        await cur.execute(
            "select *, next_due_at - finished_at as retry_in from pgleader.jobs"
            " where election = %s and name = %s",
            [election, job],
        )
        row = await cur.fetchone()
        if row is not None and check(row):
            return row
        assert clock.monotonic() < deadline, f"job {job}: not there within {timeout} s: {row}"
        await asyncio.sleep(0.05)


async def sql(db: psycopg.AsyncConnection[Any], query: str, *params: Any) -> list[Any]:
    cur = await db.execute(query, params)
    return await cur.fetchall()


def recorder(ran: list[tuple[str, str]], done: asyncio.Event | None = None) -> Any:
    """A job that notes (job, instance) of each run it makes."""

    async def job(run: JobRun) -> str:
        ran.append((run.job, run.instance_id))
        if done is not None:
            done.set()
        return f"{run.job} {len(ran)}"

    return job


async def forever(run: JobRun) -> str:
    await asyncio.Event().wait()
    return "unreachable"


async def test_jobs_start_on_election_and_are_cancelled_on_resign(start, db, dsn):
    await db.execute("create table job_writes (epoch bigint, what text)")
    runs: list[JobRun] = []
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def long_job(run: JobRun) -> str:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            async with conn.transaction():
                await run.fence(conn)
                await conn.execute("insert into job_writes values (%s, 'before')", [run.epoch])
            runs.append(run)
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            await conn.execute("insert into job_writes values (%s, 'after')", [run.epoch])
        return "unreachable"

    elector, runner = await start("a", [Job("long", long_job, every=3600)])
    await asyncio.wait_for(started.wait(), 10)
    assert runner.running() == ["long"] and runs[0].epoch == elector.epoch == 1
    started.clear()
    assert await elector.resign("test", timeout=5)
    await asyncio.wait_for(cancelled.wait(), 10)
    # elected again: the run left unfinished is due at once, under the new epoch
    await asyncio.wait_for(started.wait(), 10)
    assert [r.epoch for r in runs] == [1, 2]
    writes = await sql(db, "select * from job_writes order by epoch")
    assert writes == [(1, "before"), (2, "before")]  # nothing after the cancellation
    row = await until(db, "long", lambda r: r["running_epoch"] == 2)
    assert row["runs"] == 0 and row["outcome"] is None  # a cancelled run records nothing


async def test_a_demoted_leaders_run_is_fenced(start, db, dsn):
    await db.execute("create table job_writes (epoch bigint)")
    started, took_over = asyncio.Event(), asyncio.Event()
    late: list[asyncio.Task[None]] = []

    async def write_after_takeover(run: JobRun) -> None:
        await took_over.wait()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            async with conn.transaction():
                await run.fence(conn)
                await conn.execute("insert into job_writes values (%s)", [run.epoch])

    async def stubborn(run: JobRun) -> str:
        late.append(asyncio.ensure_future(write_after_takeover(run)))
        started.set()
        await asyncio.shield(late[0])  # outlives the cancellation at demotion
        return "written"

    a, _ = await start("a", [Job("stubborn", stubborn, every=3600)])
    b, _ = await start("b", [], lead=False)
    await asyncio.wait_for(started.wait(), 10)
    await a.stop()
    assert await b.wait_for_leadership(10) == 2
    took_over.set()
    with pytest.raises(Fenced):
        await asyncio.wait_for(late[0], 10)
    assert await sql(db, "select * from job_writes") == []
    with pytest.raises(psycopg.Error) as stale:
        await db.execute(QUERIES["finish_job"], ["main", 1, "stubborn", "succeeded", "", 1, 1])
    assert stale.value.sqlstate == "PGL01"
    row = await until(db, "stubborn", lambda r: True)
    assert (row["runs"], row["outcome"], row["running_epoch"]) == (0, None, 1)


async def test_a_new_leader_reads_the_schedule_and_resumes_only_an_unfinished_run(start, db):
    ran: list[tuple[str, str]] = []
    resumed = asyncio.Event()
    a, _ = await start("a", [Job("hourly", recorder(ran), every=3600)])
    first = await until(db, "hourly", lambda r: r["runs"] == 1)
    # a run A started and never finished: A goes away mid-run
    await db.execute("select pgleader.register_job('main', 1, 'interrupted', 3600, null, 'UTC', 9)")
    assert await sql(db, "select pgleader.start_job('main', 1, 'a', 'interrupted')") == [(True,)]
    await a.stop()
    await start(
        "b", [Job(name, recorder(ran, resumed), every=3600) for name in ("hourly", "interrupted")]
    )
    await asyncio.wait_for(resumed.wait(), 10)
    done = await until(db, "interrupted", lambda r: r["running_epoch"] is None)
    assert (done["runs"], done["running_by"], done["outcome"]) == (1, "b", "succeeded")
    assert done["next_due_at"] - done["started_at"] == timedelta(hours=1)
    # B read both in the same poll: the hourly job had run under A, so it was not due
    assert ran == [("hourly", "a"), ("interrupted", "b")]
    again = await until(db, "hourly", lambda r: True)
    assert (again["runs"], again["running_by"], again["started_at"]) == (
        1, "a", first["started_at"],
    )  # fmt: skip
    assert again["next_due_at"] == first["started_at"] + timedelta(hours=1)


async def test_a_missed_daily_run_runs_once_on_the_new_leader(start, db):
    ran: list[tuple[str, str]] = []
    job = Job("nightly", recorder(ran), daily=time(2), timezone="Asia/Kolkata")
    a, _ = await start("a", [job])
    registered = await until(db, "nightly", lambda r: True)
    assert registered["schedule"] == "daily 02:00 Asia/Kolkata"
    assert registered["next_due_at"].astimezone(IST).time() == job.daily
    await a.stop()
    await db.execute("update pgleader.jobs set next_due_at = now() - interval '1 day'")
    before = ran.copy()
    _, runner = await start("b", [job])
    row = await until(db, "nightly", lambda r: r["runs"] == registered["runs"] + 1)
    assert ran == [*before, ("nightly", "b")] and row["outcome"] == "succeeded"
    # next due: the following 02:00 in Kolkata, not at once again
    next_due = "select pgleader.job_next_due(null, '02:00', 'Asia/Kolkata', %s)"
    [(expected,)] = await sql(db, next_due, row["started_at"])
    assert row["next_due_at"] == expected > row["started_at"]
    assert runner.stats()["nightly"]["runs"] == {"succeeded": 1}


async def test_two_runners_never_run_one_job_at_once_across_takeovers(start, db):
    state = {"active": 0, "most": 0, "completed": 0}
    by: list[str] = []
    entered, release = asyncio.Event(), asyncio.Event()

    async def shared(run: JobRun) -> str:
        state["active"] += 1
        state["most"] = max(state["most"], state["active"])
        try:
            by.append(run.instance_id)
            entered.set()
            await release.wait()
        finally:
            state["active"] -= 1
        release.clear()
        state["completed"] += 1
        return "done"

    a, _ = await start("a", [Job("shared", shared, every=3600)])
    b, _ = await start("b", [Job("shared", shared, every=3600)], lead=False)
    electors = {"a": a, "b": b}
    for round_ in range(7):
        await asyncio.wait_for(entered.wait(), 10)
        entered.clear()
        if round_ % 2:  # let it finish, then ask for the next run
            release.set()
            await until(db, "shared", lambda r: r["runs"] == state["completed"])
            assert state["completed"] == (round_ + 1) // 2
            await db.execute("select pgleader.request_job('main', 'shared', 'test')")
        else:  # take over while it runs: the new leader runs it again
            assert await electors[by[-1]].resign("takeover", timeout=5)
    release.set()
    row = await until(db, "shared", lambda r: r["runs"] == 4 and r["running_epoch"] is None)
    assert state == {"active": 0, "most": 1, "completed": row["runs"]}
    assert len(by) == 8
    [(epochs,)] = await sql(db, "select count(*) from pgleader.leadership_history")
    assert epochs >= 5


async def test_a_crashing_job_stops_neither_the_other_jobs_nor_the_elector(start, db):
    alerts: list[tuple[str, int, str]] = []
    alerted = asyncio.Event()

    async def broken(run: JobRun) -> str:
        raise RuntimeError("disk on fire\ntraceback details")

    async def steady(run: JobRun) -> str:
        return "fine"

    async def on_failure(job: str, failures: int, error: str) -> None:
        alerts.append((job, failures, error))
        alerted.set()

    jobs = [Job("broken", broken, every=3600), Job("steady", steady, every=0.1)]
    elector, _ = await start("a", jobs, alert_after=2, on_failure=on_failure)
    await asyncio.wait_for(alerted.wait(), 10)
    assert alerts[0] == ("broken", 2, "disk on fire")
    ran = (await until(db, "steady", lambda r: True))["runs"]
    await until(db, "steady", lambda r: r["runs"] >= ran + 3 and r["failures"] == 0)
    assert elector.is_leader and elector.epoch == 1
    row = await until(db, "broken", lambda r: r["failures"] >= 3 and r["running_epoch"] is None)
    assert (row["outcome"], row["result"]) == ("failed", "disk on fire")
    assert row["last_success_at"] is None and row["runs"] == row["failures"]
    assert timedelta(0) < row["retry_in"] <= timedelta(seconds=0.05 * 2 ** (row["failures"] - 1))
    counts = [n for _, n, _ in alerts]
    assert counts == list(range(2, 2 * len(counts) + 1, 2))  # once per alert_after in a row


async def test_a_job_exceeding_its_timeout_ends_timed_out(start, db):
    # No retry while it is looked at (at the suite's 0.05 s one had started, running).
    elector, runner = await start(
        "a", [Job("hangs", forever, every=3600, timeout=0.2)], retry_base=60.0
    )
    row = await until(db, "hangs", lambda r: r["outcome"] is not None)
    assert (row["outcome"], row["result"], row["failures"]) == (
        "timed_out", "did not finish within 0.2 s", 1,
    )  # fmt: skip
    assert 0.2 <= row["duration_s"] < 5 and row["running_epoch"] is None
    assert runner.running() == [] and elector.is_leader


async def test_a_job_raising_its_own_timeout_error_is_a_failure(start, db):
    async def upstream(run: JobRun) -> str:
        raise TimeoutError("upstream did not answer")

    await start("a", [Job("upstream", upstream, every=3600, timeout=300)])
    row = await until(db, "upstream", lambda r: r["outcome"] is not None)
    assert (row["outcome"], row["result"]) == ("failed", "upstream did not answer")


def ist(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2024, 3, day, hour, minute, tzinfo=IST)


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        (ist(10, 1, 30), ist(10, 2)),
        (ist(10, 2), ist(11, 2)),
        (ist(10, 9), ist(11, 2)),
        (datetime(2024, 3, 9, 20, tzinfo=ZoneInfo("UTC")), ist(10, 2)),  # 01:30 on the 10th in IST
    ],
)
async def test_a_daily_schedule_is_the_next_local_time_and_an_interval_adds_seconds(
    db, after, expected
):
    query = "select pgleader.job_next_due(%s, %s, %s, %s)"
    assert await sql(db, query, None, "02:00", "Asia/Kolkata", after) == [(expected,)]
    assert await sql(db, query, 90.5, None, "UTC", after) == [(after + timedelta(seconds=90.5),)]


async def test_the_cli_lists_jobs_and_runs_one_through_the_leader(
    start, db, dsn, capsys, monkeypatch
):
    for name in ("PGLEADER_DSN", "DATABASE_URL", "PGLEADER_ELECTION"):
        monkeypatch.delenv(name, raising=False)

    async def pgleader(*argv: str) -> tuple[int, list[str], list[str]]:
        code = await asyncio.to_thread(main, ["jobs", *argv])  # main runs a loop of its own
        out, err = capsys.readouterr()
        return code, out.splitlines(), err.splitlines()

    ran: list[tuple[str, str]] = []
    elector, _ = await start("cli", [Job("report", recorder(ran), every=3600)], election="ops")
    await until(db, "report", lambda r: r["runs"] == 1, election="ops")
    ops = ["--dsn", dsn, "--election", "ops"]
    capsys.readouterr()
    with structlog.testing.capture_logs():  # the runner's logs stay out of stdout
        code, out, _ = await pgleader("--dsn", dsn, "--json")
        listed = [json.loads(line) for line in out]
        seen = [(r["job"], r["schedule"], r["runs"], r["outcome"]) for r in listed]
        assert code == 0 and seen == [("report", "every 3600 s", 1, "succeeded")]
        code, out, _ = await pgleader("run", "report", *ops, "--timeout", "10")
        printed = json.loads(out[0])
        assert (code, printed["outcome"], printed["result"]) == (0, "succeeded", "report 2")

        code, _, err = await pgleader("run", "nope", *ops)
        assert code == 2 and len(err) == 1 and "no job 'nope'" in err[0] and "report" in err[0]
        with pytest.raises(SystemExit) as exited:
            main(["jobs", "run", "--dsn", dsn])
        err = capsys.readouterr().err.splitlines()
        assert exited.value.code == 2 and len(err) == 1 and "give a job to run" in err[0]

        await elector.stop()
        code, out, _ = await pgleader("run", "report", *ops, "--timeout", "1")
        printed = json.loads(out[0])
        assert code == 1 and printed["outcome"] is None
        assert "no result within 1 s" in printed["error"]
    assert ran == [("report", "cli")] * 2


async def test_prune_removes_silent_instances_never_the_leader_and_is_fenced(db):
    # a leader by hand, as the elector does it: the lock, then take_leadership
    [(lock_id,)] = await sql(db, "select pgleader.join_election('p', 'lead', 'h', 1, 'v')")
    await db.execute("select pg_advisory_lock(pgleader.lock_namespace(), %s)", [lock_id])
    [(epoch,)] = await sql(db, "select epoch from pgleader.take_leadership('p', 'lead', 'h')")
    for instance in ("ghost", "fresh"):
        await db.execute("select pgleader.join_election('p', %s, 'h', 1, 'v')", [instance])
    await db.execute(
        "update pgleader.instances set last_heartbeat = now() - interval '1 hour'"
        " where election = 'p' and instance_id in ('lead', 'ghost')"
    )
    assert await sql(db, QUERIES["prune_instances"], "p", epoch, 60) == [("ghost",)]
    left = "select instance_id from pgleader.instances where election = 'p' order by 1"
    assert await sql(db, left) == [("fresh",), ("lead",)]
    await db.execute("update pgleader.instances set last_heartbeat = now() - interval '1 hour'")
    with pytest.raises(psycopg.Error) as stale:
        await db.execute(QUERIES["prune_instances"], ["p", epoch - 1, 60])
    assert stale.value.sqlstate == "PGL01"
    assert await sql(db, left) == [("fresh",), ("lead",)]
