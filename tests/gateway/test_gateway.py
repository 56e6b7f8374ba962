"""The gateway as users drive it: real `pgleader serve` processes, real HTTP, real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from tests.support.gateway import (
    ADMIN_TOKEN,
    SECRET,
    Cluster,
    cluster,
    minutes_ago,
    sign,
    signal_body,
    until,
)
from tests.support.metrics import samples, value


@pytest.fixture
async def gw(dsn: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(dsn, tmp_path) as c:
        yield c


async def table_counts(gw: Cluster) -> dict[str, int]:
    tables = ("signals", "orders", "paper_broker_requests", "positions")
    return {t: await gw.scalar(f"select count(*) from gateway.{t}") for t in tables}


async def test_leader_executes_a_webhook_inline_and_books_order_and_position(gw):
    (node,) = await gw.start(1)
    await gw.leader()
    status, answer = await gw.post(node, signal_body(position="Long_1"))
    assert (status, answer["status"]) == (200, "executed"), answer
    sid = answer["signal_id"]
    _, shown = await gw.get(node, f"/signals/{sid}")
    assert shown["status"] == "executed" and shown["orders"][0]["outcome"] == "filled"
    assert await gw.broker_requests_per_signal() == {sid: 1}
    rows = await gw.query(
        "select instrument, position, lots, is_base_position from gateway.positions"
    )
    assert rows == [("BANK_NIFTY", "Long_1", 5, True)]


async def test_only_the_leader_listens_and_its_own_signals_send_no_notify(gw):
    await gw.start(2)
    leader = await gw.leader()
    follower = next(n for n in gw.nodes.values() if n is not leader)

    async def only_listener_is(node) -> bool:
        rows = await gw.query(
            "select application_name from pg_stat_activity"
            " where application_name like 'gateway-listen:%%'"
        )
        return rows == [(f"gateway-listen:{node.instance_id}",)]

    await until(lambda: only_listener_is(leader))
    async with await psycopg.AsyncConnection.connect(gw.dsn, autocommit=True) as conn:
        await conn.execute("listen gateway_signals")
        status, own = await gw.post(leader, signal_body())
        assert (status, own["status"]) == (200, "executed"), own
        status, other = await gw.post(follower, signal_body())
        assert status == 202, other
        # Delivered in commit order: a NOTIFY for the leader's own signal would come first.
        heard = []
        async for note in conn.notifies(timeout=15):
            if not note.payload.isdigit():
                continue  # "halt", "reconcile": not a signal (the leader's jobs ask for these)
            heard.append(int(note.payload))
            if heard[-1] == other["signal_id"]:
                break
    assert heard == [other["signal_id"]]
    assert await gw.settled([other["signal_id"]]) == {other["signal_id"]: "executed"}

    # A handover moves the ear with the leadership: the old leader hangs up.
    url = f"{leader.operator_url}/coordinator/resign"
    async with gw.http.post(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert resp.status == 200
    await until(lambda: only_listener_is(follower))
    assert await gw.leader() is follower


async def test_follower_accepts_and_the_leader_executes(gw):
    await gw.start(2)
    leader = await gw.leader()
    follower = next(n for n in gw.nodes.values() if n is not leader)
    status, answer = await gw.post(follower, signal_body())
    assert (status, answer["status"]) == (202, "accepted"), answer
    statuses = await gw.settled([answer["signal_id"]])
    assert statuses == {answer["signal_id"]: "executed"}
    claimed_by = await gw.scalar(
        "select claimed_by from gateway.signals where id = %s", answer["signal_id"]
    )
    assert claimed_by == leader.instance_id


async def test_pyramid_links_to_its_base_and_exit_closes_the_instrument(gw):
    (node,) = await gw.start(1)
    await gw.leader()
    for body in (
        signal_body(type="BASE_ENTRY", position="Long_1"),
        signal_body(type="PYRAMID", position="Long_2", lots=2),
        signal_body(type="EXIT", position="Long_1", lots=0),
    ):
        status, answer = await gw.post(node, body)
        assert (status, answer["status"]) == (200, "executed"), answer
    rows = await gw.query(
        "select position, is_base_position, base_position_id is not null, status"
        " from gateway.positions order by id"
    )
    assert rows == [("Long_1", True, False, "closed"), ("Long_2", False, True, "closed")]
    sold = await gw.scalar(
        "select quantity from gateway.paper_broker_requests where action = 'SELL'"
    )
    assert sold == 7


async def test_same_signal_posted_concurrently_to_three_instances_gives_one_order(gw):
    nodes = await gw.start(3)
    await gw.leader()
    body = signal_body()
    answers = await asyncio.gather(*(gw.post(n, body) for n in nodes for _ in range(50)))
    assert all(200 <= status < 300 for status, _ in answers), answers
    ids = {a["signal_id"] for _, a in answers}
    assert len(ids) == 1
    assert sum(a["status"] == "duplicate" for _, a in answers) == 149
    await gw.settled(list(ids))
    assert await table_counts(gw) == {
        "signals": 1, "orders": 1, "paper_broker_requests": 1, "positions": 1,
    }  # fmt: skip


BAD_BODIES = [
    (
        "missing field",
        {k: v for k, v in signal_body().items() if k != "instrument"},
        400,
        "instrument",
    ),
    ("wrong type", signal_body(lots="5"), 400, "lots"),
    ("unknown type", signal_body(type="MARTINGALE"), 400, "type"),
    ("negative quantity", signal_body(lots=-1), 400, "lots"),
    (
        "future timestamp",
        # A day ahead: this list is made when the tests are collected, and the suite
        # runs for minutes before this test; five minutes ahead had become the present.
        signal_body(at=datetime.now(UTC) + timedelta(days=1)),
        400,
        "timestamp",
    ),
    ("wrong secret", signal_body(secret="guess"), 401, None),
    # A side that contradicts the label, or is neither long nor short: one is a mistake.
    ("short label, side long", signal_body(position="Short_1", side="long"), 400, "side"),
    ("long label, side short", signal_body(position="Long_1", side="short"), 400, "side"),
    ("side sell", signal_body(side="sell"), 400, "side"),
    ("missing secret", signal_body(secret=None), 401, None),
    ("not json", b"BUY BANKNIFTY", 401, None),
    ("bad json with the secret", f'{{"secret": "{SECRET}", "type": '.encode(), 401, None),
    ("json array", json.dumps([signal_body()]).encode(), 401, None),
]


async def test_every_bad_input_gets_its_4xx_and_nothing_is_stored(gw):
    (node,) = await gw.start(1)
    await gw.leader()
    for name, body, code, field in BAD_BODIES:
        status, answer = await gw.post(node, body)
        assert status == code, (name, answer)
        assert answer["status"] in ("invalid", "unauthorized") and answer["error"], (name, answer)
        if field:
            assert answer["field"] == field, (name, answer)
    status, answer = await gw.post(node, b"x" * 20_000)
    assert (status, answer["status"]) == (413, "too_large")
    raw = json.dumps(signal_body(secret=None)).encode()
    status, _ = await gw.post(node, raw, headers={"X-Signature": sign(raw, "other")})
    assert status == 401
    assert await table_counts(gw) == dict.fromkeys(
        ("signals", "orders", "paper_broker_requests", "positions"), 0
    )


async def test_a_refused_webhook_with_the_right_secret_is_alerted_never_an_intruders(gw):
    """TradingView does not retry a 400: the trade is lost unless someone is told."""
    (node,) = await gw.start(1)
    await gw.leader()
    intruder = signal_body(secret="wrong", lots="two")
    assert (await gw.post(node, intruder))[0] == 401
    for _ in range(4):
        status, answer = await gw.post(node, signal_body(position="Short_1", lots="two"))
        assert (status, answer["field"]) == (400, "lots"), answer
    raw = json.dumps(signal_body(secret=None, side="sell")).encode()
    status, answer = await gw.post(node, raw, headers={"X-Signature": sign(raw)})
    assert (status, answer["field"]) == (400, "side"), answer

    async def alerted() -> list[tuple[str, str]]:
        return await gw.query(
            "select kind, detail from gateway.alerts where signal_id is null order by id"
        )

    await until(lambda: _count(alerted, 2))
    rows = await alerted()
    assert {kind for kind, _ in rows} == {"signal_invalid"}
    by_field = {detail.rsplit("[field ", 1)[1].rstrip("]"): detail for _, detail in rows}
    assert set(by_field) == {"lots", "side"}, rows
    assert "lots must be a positive integer, not a string" in by_field["lots"], rows
    assert "(BASE_ENTRY BANK_NIFTY Short_1)" in by_field["lots"], rows
    assert "not stored, TradingView does not retry" in by_field["side"], rows
    assert 'side must be "long" or "short"' in by_field["side"], rows
    assert all(SECRET not in detail and "wrong" not in detail for _, detail in rows), rows
    async with gw.http.get(f"{node.operator_url}/metrics") as resp:
        text = await resp.text()
    assert value(text, "gateway_webhook_invalid_total") == 5  # the intruder's is not one
    assert await table_counts(gw) == dict.fromkeys(
        ("signals", "orders", "paper_broker_requests", "positions"), 0
    )
    # The three refusals of lots after the first wait for the next minute: one alert.
    assert len(await alerted()) == 2


async def _count(rows, n: int) -> bool:
    return len(await rows()) >= n


async def test_text_plain_body_and_hmac_signature_are_accepted(gw):
    (node,) = await gw.start(1)
    await gw.leader()
    status, answer = await gw.post(
        node, json.dumps(signal_body()), headers={"Content-Type": "text/plain"}
    )
    assert (status, answer["status"]) == (200, "executed"), answer
    raw = json.dumps(signal_body(secret=None)).encode()
    status, answer = await gw.post(node, raw, headers={"X-Signature": sign(raw)})
    assert (status, answer["status"]) == (200, "executed"), answer


async def test_signal_older_than_max_age_expires_with_an_alert(gw):
    (node,) = await gw.start(1, "--max-signal-age", "30")
    await gw.leader()
    status, answer = await gw.post(node, signal_body(at=minutes_ago(2)))
    assert (status, answer["status"]) == (200, "expired"), answer
    alerts = await gw.query("select kind, signal_id from gateway.alerts")
    assert alerts == [("signal_expired", answer["signal_id"])]
    assert await gw.scalar("select count(*) from gateway.paper_broker_requests") == 0


async def test_leader_killed_mid_stream_loses_and_duplicates_nothing(gw):
    await gw.start(3)
    first = await gw.leader()
    followers = [n for n in gw.nodes.values() if n is not first]
    accepted: list[int] = []
    midway = asyncio.Event()

    async def stream(count: int) -> None:
        for i in range(count):
            status, answer = await gw.post(followers[i % 2], signal_body())
            assert 200 <= status < 300, answer
            accepted.append(answer["signal_id"])
            if len(accepted) == 40:
                midway.set()
            await asyncio.sleep(0.01)  # a steady rate, not a synchronisation

    sender = asyncio.create_task(stream(150))
    await midway.wait()
    first.signal(signal.SIGKILL)
    await sender
    second = await gw.leader()
    assert second is not first
    statuses = await gw.settled(accepted)
    assert set(statuses.values()) == {"executed"}, statuses
    per_signal = await gw.broker_requests_per_signal()
    assert set(per_signal) == set(accepted) and set(per_signal.values()) == {1}


async def test_graceful_shutdown_resigns_and_a_follower_takes_over(gw):
    await gw.start(2)
    first = await gw.leader()
    first.signal(signal.SIGTERM)
    assert await first.wait() == 0
    second = await gw.leader()
    assert second is not first
    reason = await gw.scalar(
        "select release_reason from pgleader.leadership_history where instance_id = %s",
        first.instance_id,
    )
    assert reason == "shutdown"
    status, answer = await gw.post(second, signal_body())
    assert (status, answer["status"]) == (200, "executed")


async def test_admin_resign_needs_the_token_and_hands_over(gw):
    await gw.start(2)
    first = await gw.leader()
    url = f"{first.operator_url}/coordinator/resign"
    async with gw.http.post(url) as resp:
        assert resp.status == 401
    async with gw.http.post(url, headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    async with gw.http.post(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "resigned"
    reason = await gw.scalar(
        "select release_reason from pgleader.leadership_history where instance_id = %s",
        first.instance_id,
    )
    assert reason == "admin request"


async def test_http_surface_answers_json(gw):
    (node,) = await gw.start(1)
    await gw.leader()
    assert await gw.get(node, "/health") == (200, {"status": "ok", "instance_id": "gw1"})
    assert await gw.get(node, "/ready") == (200, {"status": "ready"})
    status, view = await gw.get(node, "/coordinator/leader")
    assert status == 200 and view["is_leader"] and view["leader"]["leader"] == "gw1"
    assert view["leader"]["lock_held"] and view["metrics"]["heartbeats_ok"] >= 0
    assert (await gw.get(node, "/signals/abc"))[0] == 400
    assert (await gw.get(node, "/signals/999999"))[0] == 404
    assert (await gw.get(node, "/nope"))[1]["status"] == "not_found"
    async with gw.http.get(f"{node.operator_url}/metrics") as resp:
        text = await resp.text()
    assert value(text, "pgleader_is_leader", election="gateway") == 1
    assert value(text, "gateway_inbox_writes_total") == 0
    status, answer = await gw.post(node, signal_body())
    assert (status, answer["status"]) == (200, "executed")
    async with gw.http.get(f"{node.operator_url}/metrics") as resp:
        text = await resp.text()
    for name in ("gateway_inbox_writes_total", "gateway_inbox_write_signals_total",
                 "gateway_execution_batches_total", "gateway_execution_batch_signals_total",
                 "gateway_inbox_write_seconds_count", "gateway_signal_execution_latency_seconds_count"):  # fmt: skip
        assert value(text, name) == 1, name
    buckets = sorted(
        (float(dict(labels)["le"]), n)
        for (name, labels), n in samples(text).items()
        if name == "gateway_inbox_write_seconds_bucket"
    )
    assert [le for le, _ in buckets] == [0.005, 0.025, 0.1, 0.5, 2.5, float("inf")]
    assert [n for _, n in buckets] == sorted(n for _, n in buckets) and buckets[-1][1] == 1
    assert 0 < value(text, "gateway_inbox_write_seconds_sum") < 3
    # The webhook's request, timed by route and code; the broker's call by outcome.
    assert value(text, "gateway_http_request_duration_seconds_count", listener="public",
                 route="/webhook", code="200") == 1  # fmt: skip
    assert value(text, "gateway_broker_requests_total", operation="place_orders",
                 outcome="ok") == 1  # fmt: skip
