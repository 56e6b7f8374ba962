"""The library's verbs for people, as a user runs them: `pgleader history`, `pgleader
instances` and `pgleader watch --human`; JSON lines when piped or asked, aligned
tables on a terminal, one-line errors (exit 1: the database; exit 2: an argument)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgleader import Elector, Timings
from tests.support.cli import CLOCK, assert_aligned, on_terminal, pgleader_here
from tests.support.gateway import pgleader_cli

FAST = Timings(heartbeat=0.2, lease=0.6, evict_after=1.2)
UNREACHABLE = "host=127.0.0.1 port=1 user=x password=hunter2 dbname=x"

# Terms of election 'seeded': epoch -> hours ago its term ended (each lasted an hour).
ENDED_HOURS_AGO = {1: 72, 2: 10, 3: 1, 4: 10 / 60, 5: 30 / 3600}


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def assert_one_line(code: int, err: str, exit_code: int, *needles: str) -> None:
    assert code == exit_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
async def seeded(db) -> None:
    """Election 'seeded': five ended terms (see ENDED_HOURS_AGO), and no leader now."""
    await db.execute("insert into pgleader.election (name, epoch) values ('seeded', 5)")
    for epoch, hours in ENDED_HOURS_AGO.items():
        await db.execute(
            "insert into pgleader.leadership_history (election, epoch, instance_id, host,"
            " acquired_at, released_at, release_reason) values ('seeded', %s, %s, 'h',"
            " now() - make_interval(secs => %s), now() - make_interval(secs => %s), %s)",
            [epoch, f"n{epoch}", hours * 3600 + 3600, hours * 3600,
             "evicted" if epoch == 2 else "shutdown"],
        )  # fmt: skip


@pytest.fixture
async def electors(dsn: str) -> AsyncIterator[list[Elector]]:
    """Electors of the gateway's election, started by the test; all stopped at the end."""
    started: list[Elector] = []
    yield started
    await asyncio.gather(*(e.stop() for e in started))


async def elect(electors: list[Elector], dsn: str, name: str) -> Elector:
    elector = Elector(dsn, "gateway", instance_id=name, timings=FAST, resign_cooldown=0.05)
    electors.append(elector)
    await elector.start()
    await elector.wait_for_leadership(10)
    return elector


async def test_history_lists_each_term_and_how_it_ended(dsn, electors):
    first = await elect(electors, dsn, "h1")
    await first.stop()
    await elect(electors, dsn, "h2")
    # piped: JSON lines; no --election: the gateway's
    code, out, err = await pgleader_cli("history", "--dsn", dsn)
    assert code == 0, err
    rows = json_lines(out)
    assert [(r["epoch"], r["leader"], r["reason"]) for r in rows] == [
        (1, "h1", "shutdown"),
        (2, "h2", "leading"),
    ]
    assert set(rows[0]) == {"epoch", "leader", "host", "from", "to", "duration_s", "reason"}
    assert rows[0]["to"] is not None and rows[1]["to"] is None
    assert 0 <= rows[0]["duration_s"] < 30 and rows[1]["duration_s"] >= 0
    assert datetime.fromisoformat(rows[0]["from"]) <= datetime.fromisoformat(rows[0]["to"])


async def test_history_since_takes_a_duration_or_an_iso_time(dsn, seeded):
    four_days_ago = (datetime.now(UTC) - timedelta(days=4)).isoformat()
    three_hours_ago_local = (datetime.now() - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M")
    cases = {
        "90s": [5],
        "30m": [4, 5],
        "2h": [3, 4, 5],
        "1d": [2, 3, 4, 5],
        four_days_ago: [1, 2, 3, 4, 5],
        three_hours_ago_local: [3, 4, 5],  # without a zone: this machine's local time
    }
    env = {"PGLEADER_ELECTION": "seeded"}
    cases[""] = [1, 2, 3, 4, 5]  # no --since: every term
    for since, expected in cases.items():
        args = ["--since", since] if since else []
        code, out, err = await pgleader_here("history", "--dsn", dsn, "--json", *args, env=env)
        assert code == 0, err
        assert [row["epoch"] for row in json_lines(out)] == expected, since


async def test_history_limit_keeps_the_latest_terms_and_election_picks_one(dsn, seeded):
    code, out, err = await pgleader_here(
        "history", "--dsn", dsn, "--election", "seeded", "--limit", "2"
    )
    assert code == 0, err
    rows = json_lines(out)
    assert [(r["epoch"], r["leader"], r["reason"]) for r in rows] == [
        (4, "n4", "shutdown"), (5, "n5", "shutdown"),
    ]  # fmt: skip
    code, out, err = await pgleader_here("history", "--dsn", dsn)  # gateway: no term yet
    assert (code, out) == (0, ""), err


def test_history_on_a_terminal_is_an_aligned_table(dsn, seeded):
    table = on_terminal("history", "--dsn", dsn, "--election", "seeded", "--since", "1d")
    lines = assert_aligned(table, ["epoch", "leader", "host", "from", "to", "duration", "reason"])
    assert len(lines) == 5
    assert re.match(rf"2\s+n2\s+h\s+{CLOCK}\s+{CLOCK}\s+1h 00m\s+evicted$", lines[1]), lines[1]


async def test_instances_show_heartbeat_age_leader_and_stale(dsn, db, electors):
    await elect(electors, dsn, "i1")
    await db.execute(
        "insert into pgleader.instances (election, instance_id, host, pid, version,"
        " last_heartbeat) values ('gateway', 'ghost', 'gone', 42, '0.0', now() - interval '1 min')"
    )
    code, out, err = await pgleader_cli("instances", "--dsn", dsn)  # the elector logs here
    assert code == 0, err
    rows = {row["instance_id"]: row for row in json_lines(out)}
    assert set(rows) == {"i1", "ghost"}
    assert (rows["i1"]["leader"], rows["i1"]["stale"]) == (True, False)
    assert rows["i1"]["heartbeat_age_s"] < 5 and rows["i1"]["pid"] == os.getpid()
    assert (rows["ghost"]["leader"], rows["ghost"]["stale"]) == (False, True)
    assert 59 < rows["ghost"]["heartbeat_age_s"] < 120 and rows["ghost"]["host"] == "gone"
    code, out, err = await pgleader_cli("instances", "--dsn", dsn, "--stale-after", "300")
    assert [row["stale"] for row in json_lines(out)] == [False, False], err
    table = await asyncio.to_thread(on_terminal, "instances", "--dsn", dsn)
    columns = ["instance_id", "host", "pid", "version", "leader", "heartbeat_age", "stale",
               "started_at"]  # fmt: skip
    lines = assert_aligned(table, columns)
    assert re.match(r"ghost\s+gone\s+42\s+0\.0\s+no\s+1m 0\ds\s+yes\s", lines[1]), lines[1]


async def test_watch_human_prints_transitions_as_lines_of_words(dsn, electors):
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgleader", "watch", "--human", "--dsn", dsn,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert watch.stdout is not None

    async def line() -> str:
        async with asyncio.timeout(15):
            return (await watch.stdout.readline()).decode().rstrip("\n")  # type: ignore[union-attr]

    try:
        assert re.fullmatch(rf"{CLOCK}  watching pgleader_events", await line())
        first = await elect(electors, dsn, "w1")
        assert re.fullmatch(rf"{CLOCK}  w1 elected leader of gateway \(epoch 1\)", await line())
        await first.stop()
        assert re.fullmatch(rf"{CLOCK}  w1 resigned the lead of gateway \(epoch 1\)", await line())
        await elect(electors, dsn, "w2")
        assert re.fullmatch(
            rf"{CLOCK}  w2 elected leader of gateway \(epoch 2, previous w1\)", await line()
        )
        # A waiter granted the lock that stopped before it led, evicted: no epoch of its own.
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(
                "select pgleader.notify_event('evicted', 'gateway', null, 'w2', 'w9')"
            )
        assert re.fullmatch(
            rf"{CLOCK}  w9 evicted of gateway by w2"
            r" \(it was granted the lock and stopped before it led\)",
            await line(),
        )
    finally:
        watch.terminate()
        await watch.wait()


async def test_an_unreachable_database_is_exit_1_in_one_line():
    runs = [["history", "--election", "x", "--since", "2h"], ["instances"], ["watch", "--human"]]
    results = [await pgleader_cli("history", "--dsn", UNREACHABLE)]  # as a user sees it
    results += [await pgleader_here(*a, "--dsn", UNREACHABLE) for a in runs]
    for args, (code, out, err) in zip([["history"], *runs], results, strict=True):
        assert_one_line(code, err, 1, f"pgleader {args[0]}: error: cannot connect to PostgreSQL"
                        " at 127.0.0.1:1/x")  # fmt: skip
        assert out == "" and "hunter2" not in err


async def test_a_bad_argument_is_exit_2_in_one_line():
    runs = [
        (["history", "--since", "2h30"], "argument --since: must be a duration"),
        (["history", "--since", "yesterday"], "90s, 30m, 2h, 1d or an ISO time"),
        (["history", "--since", "0s"], "above 0"),
        (["history", "--limit", "0"], "--limit"),
        (["instances", "--stale-after", "-1"], "--stale-after"),
        (["instances", "--bogus"], "--bogus"),
        (["history"], "PGLEADER_ELECTION: must not be empty"),
    ]
    env = {"PGLEADER_ELECTION": ""}
    results = [await pgleader_cli(*runs[0][0], "--dsn", UNREACHABLE)]  # as a user sees it
    results += [await pgleader_here(*a, "--dsn", UNREACHABLE, env=env) for a, _ in runs[1:]]
    for (_, needle), (code, out, err) in zip(runs, results, strict=True):
        assert_one_line(code, err, 2, needle)
        assert out == ""


async def test_before_migrate_the_verbs_say_what_to_do(empty_database_dsn):
    for verb in ("history", "instances"):
        code, _, err = await pgleader_here(verb, "--dsn", empty_database_dsn)
        assert_one_line(code, err, 2, "run `pgleader migrate`")
