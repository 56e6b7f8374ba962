"""The gateway's verbs for people: `pgleader signals`, `pgleader positions`, `pgleader
alerts`, and alerts in `pgleader watch --human`; JSON lines when piped or asked,
aligned tables on a terminal, one-line errors (exit 1: the database; exit 2: an
argument). The ledger is seeded with plain rows, as the executor leaves them."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.cli import CLOCK, assert_aligned, on_terminal, pgleader_here
from tests.support.gateway import pgleader_cli

UNREACHABLE = "host=127.0.0.1 port=1 user=x password=hunter2 dbname=x"

# id -> (status, seconds since received, type, instrument, position, side, lots)
SIGNALS = {
    1: ("executed", 2 * 86400, "BASE_ENTRY", "NIFTY", "Long_1", "long", 1),
    2: ("executed", 3 * 3600, "BASE_ENTRY", "BANK_NIFTY", "Long_2", "long", 2),
    3: ("pending", 10 * 60, "PYRAMID", "BANK_NIFTY", "Long_3", "long", 3),
    4: ("failed", 30, "EXIT", "NIFTY", "Long_1", "long", 1),
}


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
async def ledger(db) -> None:
    """SIGNALS; signal 2 filled by one order; open BANK_NIFTY long 2 lots at 52000 and 3
    at 52100 (entries Long_2, Long_3), NIFTY short 1 open and long 1 closed; alerts."""
    for sid, (status, ago, kind, instrument, position, side, lots) in SIGNALS.items():
        claimed = None if status == "pending" else 1
        detail = "broker refused: margin\nshortfall" if status == "failed" else None
        await db.execute(
            "insert into gateway.signals (id, fingerprint, type, instrument, position, side,"
            " lots, price, signal_at, payload, received_by, received_at, status,"
            " claimed_epoch, detail) overriding system value values (%s, %s, %s, %s, %s, %s,"
            " %s, 52000.5, now(), '{}', 'gw1', now() - make_interval(secs => %s), %s, %s, %s)",
            [sid, f"fp{sid}", kind, instrument, position, side, lots, ago, status, claimed,
             detail],
        )  # fmt: skip
    await db.execute(
        "insert into gateway.orders (signal_id, epoch, instance_id, broker, client_order_id,"
        " action, quantity, outcome, side, lots, start_position, target_position, symbol)"
        " values (2, 1, 'gw1', 'paper', 'coid-2', 'BUY', 60, 'filled', 'long', 2, 0, 60,"
        " 'BANKNIFTY29DEC26FUT')"
    )
    for instrument, position, side, lots, price, status in [
        ("BANK_NIFTY", "Long_2", "long", 2, 52000, "open"),
        ("BANK_NIFTY", "Long_3", "long", 3, 52100, "open"),
        ("NIFTY", "Short_1", "short", 1, 24000, "open"),
        ("NIFTY", "Long_1", "long", 1, 23900, "closed"),
    ]:
        await db.execute(
            "insert into gateway.positions (instrument, position, is_base_position, lots,"
            " entry_price, side, status, entry_at) values (%s, %s, true, %s, %s, %s, %s,"
            " now() - interval '1 hour')",
            [instrument, position, lots, price, side, status],
        )
    await db.execute(
        "insert into gateway.alerts (kind, instance_id, detail, created_at)"
        " values ('spool_replayed', 'gw2', 'old news', now() - interval '2 days')"
    )
    await db.execute("select gateway.raise_alert('order_in_doubt', 4, 'gw1', 'no answer')")


async def test_signals_lists_the_latest_first_with_their_orders(dsn, ledger):
    code, out, err = await pgleader_here("signals", "--dsn", dsn)
    assert code == 0, err
    rows = json_lines(out)
    assert [row["id"] for row in rows] == [4, 3, 2, 1]
    second = rows[2]
    assert (second["status"], second["instrument"], second["lots"], second["price"]) == (
        "executed", "BANK_NIFTY", 2, 52000.5,
    )  # fmt: skip
    assert second["received_by"] == "gw1" and second["epoch"] == 1
    [order] = second["orders"]
    assert order["client_order_id"] == "coid-2" and order["outcome"] == "filled"
    assert (order["symbol"], order["start_position"], order["target_position"]) == (
        "BANKNIFTY29DEC26FUT", 0, 60,
    )  # fmt: skip
    assert rows[1]["orders"] == [] and rows[1]["epoch"] is None
    assert rows[0]["detail"] == "broker refused: margin\nshortfall"


async def test_signals_filter_by_status_since_and_limit(dsn, ledger):
    local = (datetime.now() - timedelta(hours=4)).strftime("%Y-%m-%d %H:%M")
    cases = [
        (["--status", "executed"], [2, 1]),
        (["--status", "in_doubt"], []),
        (["--since", "90s"], [4]),
        (["--since", "30m"], [4, 3]),
        (["--since", "2h"], [4, 3]),
        (["--since", "1d"], [4, 3, 2]),
        (["--since", (datetime.now(UTC) - timedelta(days=3)).isoformat()], [4, 3, 2, 1]),
        (["--since", local], [4, 3, 2]),
        (["--since", "1d", "--status", "executed"], [2]),
        (["--limit", "2"], [4, 3]),
    ]
    for args, ids in cases:
        code, out, err = await pgleader_here("signals", "--dsn", dsn, "--json", *args)
        assert code == 0, err
        assert [row["id"] for row in json_lines(out)] == ids, args


async def test_positions_sum_the_open_entries_per_instrument_and_side(dsn, ledger):
    code, out, err = await pgleader_here("positions", "--dsn", dsn)
    assert code == 0, err
    rows = json_lines(out)
    assert [(r["instrument"], r["side"], r["lots"], r["entries"]) for r in rows] == [
        ("BANK_NIFTY", "long", 5, 2),
        ("NIFTY", "short", 1, 1),
    ]
    assert rows[0]["avg_entry_price"] == pytest.approx(52060)  # (2 x 52000 + 3 x 52100) / 5
    assert rows[0]["positions"] == "Long_2, Long_3" and rows[1]["positions"] == "Short_1"


async def test_alerts_lists_the_latest_first_within_since(dsn, ledger):
    code, out, err = await pgleader_here("alerts", "--dsn", dsn)
    assert code == 0, err
    rows = json_lines(out)
    assert [(r["kind"], r["signal_id"], r["instance_id"]) for r in rows] == [
        ("order_in_doubt", 4, "gw1"),
        ("spool_replayed", None, "gw2"),
    ]
    assert rows[0]["detail"] == "no answer"
    code, out, err = await pgleader_here("alerts", "--dsn", dsn, "--since", "1h")
    assert [r["kind"] for r in json_lines(out)] == ["order_in_doubt"], err
    code, out, err = await pgleader_here("alerts", "--dsn", dsn, "--limit", "1", "--since", "3d")
    assert [r["kind"] for r in json_lines(out)] == ["order_in_doubt"], err


def test_on_a_terminal_the_verbs_print_aligned_tables(dsn, ledger):
    columns = ["id", "received_at", "type", "instrument", "position", "side", "lots", "status",
               "by", "epoch", "orders", "detail"]  # fmt: skip
    lines = assert_aligned(on_terminal("signals", "--dsn", dsn), columns)
    assert len(lines) == 5
    assert re.search(r"executed\s+gw1\s+1\s+filled BANKNIFTY29DEC26FUT 0->60\s+-$", lines[3])
    assert lines[1].endswith("broker refused: margin shortfall"), lines[1]
    columns = ["instrument", "side", "lots", "entries", "avg_entry_price", "since", "contract",
               "positions"]  # fmt: skip
    lines = assert_aligned(on_terminal("positions", "--dsn", dsn), columns)
    assert re.match(rf"BANK_NIFTY\s+long\s+5\s+2\s+52060\s+{CLOCK}\s+-\s+Long_2, Long_3$",
                    lines[1]), lines[1]  # fmt: skip
    columns = ["id", "created_at", "kind", "signal_id", "instance_id", "detail"]
    lines = assert_aligned(on_terminal("alerts", "--dsn", dsn), columns)
    assert re.match(rf"2\s+{CLOCK}\s+order_in_doubt\s+4\s+gw1\s+no answer$", lines[1]), lines[1]


async def test_watch_human_prints_an_alert_readably(dsn, db):
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgleader", "watch", "--human", "--dsn", dsn,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert watch.stdout is not None
    try:
        async with asyncio.timeout(15):
            assert (await watch.stdout.readline()).decode().endswith("watching pgleader_events\n")
            await db.execute("select gateway.raise_alert('broker_unreachable', null, 'gw3',"
                             " 'OpenAlgo: connection\nrefused')")  # fmt: skip
            line = (await watch.stdout.readline()).decode()
        assert re.fullmatch(
            rf"{CLOCK}  ALERT broker_unreachable: OpenAlgo: connection refused \(instance gw3\)\n",
            line,
        ), line
    finally:
        watch.terminate()
        await watch.wait()


async def test_errors_are_one_line_exit_1_for_the_database_and_2_for_an_argument(
    empty_database_dsn,
):
    runs = [
        (["signals", "--dsn", UNREACHABLE], 1, "pgleader signals: error: cannot connect"),
        (["positions", "--dsn", UNREACHABLE], 1, "pgleader positions: error: cannot connect"),
        (["alerts", "--dsn", UNREACHABLE, "--since", "2h"], 1, "cannot connect to PostgreSQL"),
        (["signals", "--status", "done"], 2, "argument --status: must be one of pending,"),
        (["signals", "--since", "2h30"], 2, "argument --since: must be a duration such as 90s"),
        (["alerts", "--since", "soon"], 2, "argument --since"),
        (["alerts", "--limit", "-1"], 2, "argument --limit"),
        (["positions", "--dsn", empty_database_dsn], 2, "run `pgleader migrate`"),
    ]
    # One as a user runs it (a real exit), the others in this process.
    results = [await pgleader_cli(*runs[0][0])]
    results += [await pgleader_here(*args) for args, _, _ in runs[1:]]
    for (args, expected, needle), (code, out, err) in zip(runs, results, strict=True):
        assert code == expected, (args, err)
        assert out == "" and "Traceback" not in err and "hunter2" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, err)
