"""The gateway's housekeeping jobs on a real instance (paper broker): retention
keeps the trading record, statistics, stale instances, and how an operator runs
and reads them (HTTP, CLI, /metrics)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import (
    Cluster,
    GatewayProcess,
    cluster,
    distinct_time,
    pgleader_cli,
    query_true,
    signal_body,
    until,
)

pytestmark = pytest.mark.asyncio(loop_scope="function")


@pytest.fixture
async def one(dsn: str, tmp_path: Path) -> AsyncIterator[tuple[Cluster, GatewayProcess]]:
    async with cluster(dsn, tmp_path) as gw:
        (node,) = await gw.start(1, env={"PGLEADER_RETENTION_DAYS": "1"})
        await gw.leader()
        yield gw, node


async def executed(gw: Cluster, node: GatewayProcess, **fields: Any) -> int:
    status, answer = await gw.post(node, signal_body(at=distinct_time(), **fields))
    assert (status, answer["status"]) == (200, "executed"), answer
    return int(answer["signal_id"])


async def run(gw: Cluster, node: GatewayProcess, job: str) -> dict[str, Any]:
    status, answer = await gw.admin(node, f"/admin/jobs/{job}/run")
    assert (status, answer["outcome"]) == (200, "succeeded"), answer
    return answer


async def test_retention_deletes_old_finished_signals_and_keeps_the_trading_record(one):
    gw, node = one
    closed_entry = await executed(gw, node, instrument="OLD", lots=2, position="Long_1")
    closed_exit = await executed(gw, node, instrument="OLD", type="EXIT", lots=0,
                                 position="Long_1")  # fmt: skip
    still_open = await executed(gw, node, instrument="HELD", lots=1)
    stuck = await executed(gw, node, instrument="DOUBT", lots=1)
    await gw.query("update gateway.signals set status = 'in_doubt' where id = %s", stuck)
    await gw.query("select gateway.set_trading_halt('halted', 'test', 'test')")
    status, waiting = await gw.post(node, signal_body(instrument="NEW", at=distinct_time()))
    assert (status, waiting["status"]) == (202, "accepted"), waiting
    recent = int(waiting["signal_id"])
    aged = [closed_entry, closed_exit, still_open, stuck, recent]
    await gw.query("update gateway.signals set finished_at = now() - interval '2 days',"
                   " received_at = now() - interval '2 days' where id = any(%s)", aged)  # fmt: skip
    await gw.query("select gateway.raise_alert('test', %s, 'test', 'about the old entry')",
                   closed_entry)  # fmt: skip
    orders_before = await gw.query(
        "select client_order_id, instrument, side, lots, symbol from gateway.orders order by id"
    )

    answer = await run(gw, node, "retention")

    assert answer["result"] == "2 signal(s) older than 1 day(s) deleted", answer
    left = {row[0] for row in await gw.query("select id from gateway.signals")}
    assert left == {still_open, stuck, recent}  # open position, in doubt, pending
    # The record survives its signals: every order (with what an audit needs), the
    # closed position, the alert.
    orders_after = await gw.query(
        "select client_order_id, instrument, side, lots, symbol from gateway.orders order by id"
    )
    assert orders_after == orders_before
    assert await gw.query(
        "select signal_id, status, lots from gateway.positions where instrument = 'OLD'"
    ) == [(None, "closed", 2)]
    assert await gw.alerts("test") == ["about the old entry"]
    # Nothing else is due: a second run deletes nothing.
    assert (await run(gw, node, "retention"))["result"].startswith("0 signal(s)")


async def test_statistics_count_signals_orders_and_positions_with_realised_pnl(one):
    gw, node = one
    await executed(gw, node, instrument="STATS_A", lots=2, position="Long_9", price=100)
    await executed(gw, node, instrument="STATS_A", type="EXIT", lots=0, position="Long_9",
                   price=110)  # fmt: skip
    await executed(gw, node, instrument="STATS_B", lots=3, position="Short_9", side="short")

    await run(gw, node, "statistics")
    status, found = await gw.get(node, "/statistics")

    assert status == 200, found
    stats = found["statistics"]
    opened = [(p["instrument"], p["side"], p["lots"]) for p in stats["open_positions"]]
    assert opened == [("STATS_B", "short", 3)]
    assert stats["orders_by_outcome"] == {"filled": 3}
    executed_today = sum(d["signals"] for d in stats["signals_by_day"] if d["status"] == "executed")
    assert executed_today == 3
    # Long 2 lots from 100 to 110, lot size 1 without an instruments file: 20.
    pnl = stats["realised_pnl"]["by_instrument"]
    assert {k: Decimal(v) for k, v in pnl.items()} == {"STATS_A": 20}
    assert stats["last_reconciliation"]["outcome"] == "matched"
    code, out, err = await pgleader_cli("stats", "--dsn", gw.dsn)
    assert code == 0, err
    assert json.loads(out)["statistics"]["orders_by_outcome"] == {"filled": 3}


def by_day(stats: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {(d["day"], d["status"]): d["signals"] for d in stats["signals_by_day"]}


async def test_statistics_count_old_days_once_and_again_only_when_they_change(one):
    """signals_by_day reads only the days that can still change: a day whose
    signals all ended keeps the last run's counts (even once retention deleted
    them), a day with a signal still open or ended since is counted again."""
    gw, node = one
    doubtful = await executed(gw, node, instrument="DAY_A", lots=1)
    settled = await executed(gw, node, instrument="DAY_B", lots=1)
    await gw.query("update gateway.signals set status = 'in_doubt' where id = %s", doubtful)
    await gw.query("update gateway.signals set received_at = now() - interval '3 days',"
                   " finished_at = now() - interval '3 days' where id = any(%s)",
                   [doubtful, settled])  # fmt: skip
    day = await gw.scalar("select ((now() - interval '3 days') at time zone 'UTC')::date::text")
    await run(gw, node, "statistics")
    _, found = await gw.get(node, "/statistics")
    assert by_day(found["statistics"])[(day, "in_doubt")] == 1
    assert by_day(found["statistics"])[(day, "executed")] == 1

    # The doubt is settled (it ends now): its day is counted again.
    await gw.query("update gateway.signals set status = 'executed', finished_at = now()"
                   " where id = %s", doubtful)  # fmt: skip
    await run(gw, node, "statistics")
    _, found = await gw.get(node, "/statistics")
    counts = by_day(found["statistics"])
    assert (day, "in_doubt") not in counts
    assert counts[(day, "executed")] == 2

    # Retention deletes that day's signals (ended long ago, their positions closed);
    # the statistics keep counting them.
    await gw.query("update gateway.signals set finished_at = now() - interval '3 days'"
                   " where id = %s", doubtful)  # fmt: skip
    await gw.query("update gateway.positions set status = 'closed' where signal_id = any(%s)",
                   [doubtful, settled])  # fmt: skip
    assert (await run(gw, node, "retention"))["result"].startswith("2 signal(s)")
    await run(gw, node, "statistics")
    _, found = await gw.get(node, "/statistics")
    assert by_day(found["statistics"])[(day, "executed")] == 2


async def test_stale_instances_leave_the_registry_but_not_the_history(one):
    gw, node = one
    first_run = ("select runs > 0 and not running from pgleader.job_status"
                 " where job = 'prune-instances'")  # fmt: skip
    await until(query_true(gw, first_run))  # the run at election is over
    await gw.query(
        "insert into pgleader.instances (election, instance_id, last_heartbeat)"
        " values ('gateway', 'gone-for-days', now() - interval '3 days')"
    )
    await gw.query("insert into gateway.instance_settings (election, instance_id, fingerprint)"
                   " values ('gateway', 'gone-for-days', 'x')")  # fmt: skip

    code, out, err = await pgleader_cli("jobs", "run", "prune-instances", "--dsn", gw.dsn)

    assert code == 0, err
    assert json.loads(out)["result"] == "1 stale instance(s) removed: gone-for-days"
    instances = {r[0] for r in await gw.query("select instance_id from pgleader.instances")}
    assert instances == {node.instance_id}
    assert await gw.scalar("select count(*) from gateway.instance_settings"
                           " where instance_id = 'gone-for-days'") == 0  # fmt: skip
    history = "select count(*) from pgleader.leadership_history where instance_id = %s"
    assert await gw.scalar(history, node.instance_id) == 1


async def test_an_operator_lists_runs_and_watches_the_jobs(one):
    gw, node = one
    for token in (None, "wrong"):
        status, answer = await gw.admin(node, "/admin/jobs/statistics/run", token=token)
        assert status == 401, answer
    status, answer = await gw.admin(node, "/admin/jobs/nope/run")
    assert (status, answer["status"]) == (404, "unknown_job"), answer
    assert "retention" in answer["error"]

    status, listed = await gw.get(node, "/jobs")
    assert status == 200, listed
    names = {j["job"] for j in listed["jobs"]}
    assert names == {"reconcile", "rollover", "retention", "statistics", "prune-instances"}
    code, out, err = await pgleader_cli("jobs", "--dsn", gw.dsn, "--election", "gateway")
    assert code == 0, err
    assert {json.loads(line)["job"] for line in out.splitlines()} == names
    async with gw.http.get(f"{node.operator_url}/metrics") as resp:
        text = await resp.text()
    assert 'pgleader_job_runs_total{job="statistics",outcome="succeeded"}' in text
    assert 'pgleader_job_seconds_since_success{job="retention"}' in text
    view = await gw.query("select job, outcome from pgleader.job_status where election = 'gateway'")
    assert {job for job, _ in view} == names
