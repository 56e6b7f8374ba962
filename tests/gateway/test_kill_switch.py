"""The kill switch: an operator stops trading over HTTP or the CLI, and the gateway
sends nothing (or only exits) until resumed, across a failover too.

Real `pgleader serve` processes trading at the fake OpenAlgo: "sends nothing" is
read at the fake, whose order book is the broker's. Most tests share one gateway
(module scope), each on instruments of its own; every test ends with trading
resumed.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.support.database import cloned_database
from tests.support.gateway import (
    Trading,
    futures,
    pgleader_cli,
    query_true,
    trading_at,
    until,
)
from tests.support.metrics import value

pytestmark = pytest.mark.asyncio(loop_scope="module")

SHARED = futures("HELD", "EXITS_A", "ENTRIES_B", "CLI_HELD")


@pytest.fixture(scope="module")
def shared_dsn(pg_template: Any) -> Iterator[str]:
    with cloned_database(pg_template, "pgleader_kill_switch") as dsn:
        yield dsn


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_trading(
    shared_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Trading]:
    tmp = Path(tmp_path_factory.mktemp("kill-switch"))
    async with trading_at(shared_dsn, tmp, SHARED) as t:
        yield t


@pytest_asyncio.fixture(loop_scope="module")
async def trading(shared_trading: Trading) -> AsyncIterator[Trading]:
    """The shared gateway; trading runs again after each test, whatever it did."""
    yield shared_trading
    await shared_trading.gw.query("select gateway.set_trading_halt('running', null, 'test')")


async def halted(t: Trading, body: Any = None) -> dict[str, Any]:
    status, answer = await t.gw.admin(t.node, "/admin/halt", body)
    assert status == 200, answer
    return answer


async def resumed(t: Trading) -> dict[str, Any]:
    status, answer = await t.gw.admin(t.node, "/admin/resume")
    assert status == 200, answer
    return answer


async def test_admin_requests_need_the_admin_token(trading):
    paths = ("/admin/halt", "/admin/resume", "/admin/reconcile")
    runs = "select count(*) from gateway.reconciliations"
    runs_before = await trading.gw.scalar(runs)
    for path in paths:
        for token in (None, "wrong-token"):
            status, answer = await trading.gw.admin(trading.node, path, {}, token=token)
            assert (status, answer["status"]) == (401, "unauthorized"), (path, token, answer)
    # An instance without an admin token refuses every admin request.
    (closed,) = await trading.gw.start(1, env={**trading.env, "PGLEADER_ADMIN_TOKEN": ""})
    try:
        for path in paths:
            status, answer = await trading.gw.admin(closed, path, {"reason": "x"})
            assert (status, answer["status"]) == (403, "forbidden"), (path, answer)
    finally:
        await closed.stop()
    assert await trading.halt_mode() == "running"
    assert await trading.gw.alerts("trading_halted") == []
    assert await trading.gw.scalar(runs) == runs_before


async def test_a_halted_gateway_holds_signals_and_sends_them_on_resume(trading):
    answer = await halted(trading, {"reason": "broker maintenance"})
    assert (answer["status"], answer["reason"]) == ("halted", "broker maintenance"), answer
    assert await trading.halt_mode() == "halted"
    assert any("broker maintenance" in a for a in await trading.gw.alerts("trading_halted"))
    _, view = await trading.gw.get(trading.node, "/coordinator/leader")
    assert view["trading"]["halt"]["mode"] == "halted", view["trading"]

    status, entry = await trading.post(instrument="HELD", lots=1)
    assert (status, entry["status"]) == (202, "accepted"), entry  # after the leader's claim
    assert await trading.status(entry["signal_id"]) == "pending"
    assert trading.orders("HELD") == []

    async def oldest_pending() -> float:  # the database's count, every 5 s
        async with trading.gw.http.get(f"{trading.node.operator_url}/metrics") as resp:
            text = await resp.text()
        return value(text, "gateway_signal_oldest_age_seconds", status="pending") or 0.0

    await until(lambda: _positive(oldest_pending), timeout=20)
    assert trading.orders("HELD") == []

    assert (await resumed(trading))["status"] == "running"
    await trading.reaches(entry["signal_id"], "executed")
    assert trading.orders("HELD") == [("BUY", 75)]
    assert await trading.gw.alerts("trading_resumed")


async def _positive(figure) -> bool:
    return await figure() > 0


async def test_entries_only_lets_exits_out_and_holds_entries(trading):
    status, opened = await trading.post(instrument="EXITS_A", lots=2)
    assert (status, opened["status"]) == (200, "executed"), opened
    answer = await halted(trading, {"reason": "risk limit", "entries_only": True})
    assert answer["status"] == "entries_only", answer

    status, entry = await trading.post(instrument="ENTRIES_B", lots=1)
    assert (status, entry["status"]) == (202, "accepted"), entry
    status, exit_ = await trading.post(instrument="EXITS_A", type="EXIT", lots=0)
    assert (status, exit_["status"]) == (200, "executed"), exit_
    assert trading.orders("EXITS_A") == [("BUY", 150), ("SELL", 150)]
    assert await trading.status(entry["signal_id"]) == "pending"
    assert trading.orders("ENTRIES_B") == []

    await resumed(trading)
    await trading.reaches(entry["signal_id"], "executed")
    assert trading.orders("ENTRIES_B") == [("BUY", 75)]


async def test_the_cli_halts_and_resumes_a_running_gateway(trading):
    dsn = trading.gw.dsn
    code, out, err = await pgleader_cli("halt", "--dsn", dsn, "--reason", "from a shell")
    assert code == 0, err
    assert json.loads(out) == {"trading": "halted", "before": "running", "reason": "from a shell"}
    assert await trading.halt_mode() == "halted"

    status, entry = await trading.post(instrument="CLI_HELD", lots=1)
    assert status == 202, entry
    assert await trading.status(entry["signal_id"]) == "pending"
    assert trading.orders("CLI_HELD") == []

    code, out, err = await pgleader_cli("resume", "--dsn", dsn)
    assert code == 0, err
    assert json.loads(out)["trading"] == "running"
    await trading.reaches(entry["signal_id"], "executed")
    assert trading.orders("CLI_HELD") == [("BUY", 75)]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"reason": 5}, "reason"),
        ({"reason": "two\nlines"}, "reason"),
        ({"reason": "x" * 501}, "reason"),
        ({"entries_only": "yes"}, "entries_only"),
        ({"reason": "r", "mode": "halted"}, "mode"),  # an unknown field
        ("not json", "JSON object"),
        ("[true]", "JSON object"),
    ],
    ids=[
        "reason-number",
        "reason-lines",
        "reason-long",
        "entries-only-text",
        "unknown",
        "text",
        "array",
    ],
)
async def test_a_bad_halt_request_is_refused_naming_what_is_wrong(trading, body, named):
    status, answer = await trading.gw.admin(trading.node, "/admin/halt", body)
    assert (status, answer["status"]) == (400, "invalid"), answer
    assert answer.get("field", named) == named and named in answer["error"], answer
    assert await trading.halt_mode() == "running"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["halt", "--reason", "r", "--bogus"], "--bogus"),
        (["halt"], "--reason"),
        (["halt", "--reason", "r"], "no database given"),
        (["resume", "--dsn", "host=127.0.0.1 port=1 user=x dbname=x"], "cannot connect"),
        (["reconcile", "--timeout", "0", "--dsn", "x"], "--timeout"),
    ],
    ids=["unknown-flag", "no-reason", "no-database", "unreachable", "bad-timeout"],
)
async def test_a_cli_mistake_is_one_line_without_a_traceback(args, needle):
    code, out, err = await pgleader_cli(*args)
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


# ------------------------------------------------------------------ own gateways


async def test_a_halt_survives_the_leaders_death(dsn, tmp_path):
    async with trading_at(dsn, tmp_path, futures("FAILOVER"), nodes=2) as t:
        old = t.node
        follower = next(n for n in t.gw.nodes.values() if n is not old)
        status, answer = await t.gw.admin(follower, "/admin/halt", {"reason": "hands off"})
        assert status == 200, answer
        status, before = await t.post(instrument="FAILOVER", lots=1)
        assert status == 202, before

        old.signal(signal.SIGKILL)
        await old.wait()
        new = await t.gw.leader()
        assert new is follower
        await until(
            query_true(
                t.gw,
                "select count(*) > 0 from gateway.reconciliations where instance_id = %s",
                new.instance_id,
            )
        )  # the new leader is at work
        status, after = await t.post(follower, instrument="FAILOVER", type="PYRAMID", lots=1)
        assert (status, after["status"]) == (202, "accepted"), after
        statuses = [await t.status(a["signal_id"]) for a in (before, after)]
        assert statuses == ["pending", "pending"]
        assert t.orders("FAILOVER") == []
        assert await t.halt_mode() == "halted"

        status, answer = await t.gw.admin(follower, "/admin/resume")
        assert status == 200, answer
        ids = [before["signal_id"], after["signal_id"]]
        assert await t.gw.settled(ids) == dict.fromkeys(ids, "executed")
        assert t.orders("FAILOVER") == [("BUY", 75), ("BUY", 75)]


async def test_halt_action_reject_refuses_what_the_halt_holds(dsn, tmp_path):
    async with trading_at(dsn, tmp_path, futures("REFUSED"), halt_action="reject") as t:
        status, answer = await t.post(instrument="REFUSED", lots=1)
        assert (status, answer["status"]) == (200, "executed"), answer
        code, _, err = await pgleader_cli(
            "halt", "--dsn", t.gw.dsn, "--reason", "closing", "--entries-only"
        )
        assert code == 0, err
        status, answer = await t.post(instrument="REFUSED", type="PYRAMID", lots=1)
        assert (status, answer["status"]) == (200, "rejected"), answer
        (alert,) = await t.gw.alerts("signal_rejected")
        assert "trading is entries only" in alert, alert
        status, answer = await t.post(instrument="REFUSED", type="EXIT", lots=0)
        assert (status, answer["status"]) == (200, "executed"), answer
        assert t.orders("REFUSED") == [("BUY", 75), ("SELL", 75)]
