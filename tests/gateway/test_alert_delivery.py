"""Alert delivery on real `pgleader serve` processes: the leader forwards every alert and
leadership transition to Telegram, a Slack webhook and a JSON webhook (a receiver the
test runs, over real HTTP, answering as they do), records each delivery, retries with
backoff, honours a 429's retry-after, groups bursts, never writes a secret into an
error or a log line, and loses nothing when the leader dies mid-delivery."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pgleader.embedded import free_port
from service.alerts.outage import OutageAlarm
from service.alerts.sinks import build_sinks
from service.config import SinkSettings
from tests.support.gateway import (
    Cluster,
    cluster,
    eventually,
    pgleader_cli,
    query_true,
    signal_body,
    until,
)
from tests.support.sinks import HOOK_PATH, SINKS, SLACK_PATH, TOKEN, SinkReceiver

# Quick retries and grouping: the settings a test cluster runs with.
FAST = {"PGLEADER_ALERT_GROUP_INTERVAL": "0.5", "PGLEADER_ALERT_TIMEOUT": "5"}
ALL_DELIVERED = (
    "select count(*) > 0 and bool_and(delivered_at is not null) from gateway.alert_deliveries"
)


@pytest.fixture
async def receiver() -> AsyncIterator[SinkReceiver]:
    r = SinkReceiver()
    await r.start()
    yield r
    await r.close()


@pytest.fixture
async def gw(dsn: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(dsn, tmp_path) as c:
        yield c


async def deliveries(gw: Cluster, sink: str) -> list[dict[str, Any]]:
    rows = await gw.query(
        "select row_to_json(d)::text from gateway.alert_deliveries d where sink = %s order by id",
        sink,
    )
    return [json.loads(r[0]) for r in rows]


async def raise_alert(gw: Cluster, kind: str, detail: str) -> None:
    await gw.query("select gateway.raise_alert(%s, null, 'tester', %s)", kind, detail)


def got(receiver: SinkReceiver, sink: str, needle: str) -> bool:
    return any(needle in text for text in receiver.texts(sink))


async def test_an_alert_and_a_transition_reach_telegram_slack_and_the_webhook(gw, receiver):
    (node,) = await gw.start(1, env={**receiver.env(), **FAST})
    await gw.leader()
    elected = f"{node.instance_id} leads election gateway (epoch 1)"
    await eventually(lambda: all(got(receiver, s, elected) for s in SINKS))

    status, _ = await gw.admin(node, "/admin/halt", {"reason": "alert delivery test"})
    assert status == 200
    await eventually(lambda: all(got(receiver, s, "alert delivery test") for s in SINKS))

    (telegram,) = [r for r in receiver.received["telegram"] if "alert delivery test" in r.text]
    assert telegram.body["chat_id"] == receiver.chat_id
    assert telegram.text.startswith("CRITICAL trading_halted · pgleader gateway")
    (hook,) = [b for b in receiver.bodies("webhook") if b["kind"] == "trading_halted"]
    assert hook["severity"] == "critical" and hook["repeat"] is False
    assert "alert delivery test" in hook["text"] and hook["election"] == "gateway"
    assert hook["epoch"] == 1 and hook["sender"] == {"instance": node.instance_id, "epoch": 1}
    (transition,) = [b for b in receiver.bodies("webhook") if b["kind"] == "leader_elected"]
    assert (transition["epoch"], transition["instance"]) == (1, node.instance_id)

    await until(query_true(gw, ALL_DELIVERED))
    for sink in SINKS:
        rows = await deliveries(gw, sink)
        assert [(r["attempts"], r["repeat"], r["last_error"]) for r in rows] == [
            (1, False, None)
        ] * 2
        assert {r["claimed_by"] for r in rows} == {node.instance_id}

    code, out, err = await pgleader_cli("sinks", "--dsn", gw.dsn)
    assert code == 0, err
    listed = {row["sink"]: row for row in map(json.loads, out.splitlines())}
    assert set(listed) == set(SINKS)
    assert {(r["pending"], r["delivered"], r["given_up"]) for r in listed.values()} == {(0, 2, 0)}


async def test_a_429_is_honoured_and_a_5xx_retried_until_delivered(gw, receiver):
    receiver.fail("telegram", "429:2")
    receiver.fail("slack", "429:3", "500")
    receiver.fail("webhook", "500", "503")
    (node,) = await gw.start(1, env={**receiver.env(), **FAST})
    await gw.leader()
    try:
        await until(query_true(gw, ALL_DELIVERED), timeout=60)
    except TimeoutError:  # say what was left, and what the instance logged
        left = await gw.query("select sink, attempts, next_attempt_at, last_error"
                              " from gateway.alert_deliveries where delivered_at is null")  # fmt: skip
        raise AssertionError(f"not delivered: {left}\n{node.log_tail(40)}") from None

    first, second = receiver.requests["telegram"][:2]
    assert second - first >= 1.5  # Telegram said "retry after 2"
    first, second = receiver.requests["slack"][:2]
    assert second - first >= 2.5  # Slack's Retry-After: 3
    for sink, attempts, error in [
        ("telegram", 2, "telegram: HTTP 429: Too Many Requests: retry after 2"),
        ("slack", 3, "slack: HTTP 500: rollup_error"),
        ("webhook", 3, 'webhook: HTTP 503: {"error": "fault"}'),
    ]:
        (row,) = await deliveries(gw, sink)
        assert (row["attempts"], row["last_error"], row["repeat"]) == (attempts, error, False)
        assert len(receiver.received[sink]) == 1  # delivered once, whatever was retried


async def test_a_burst_is_grouped_and_nothing_is_left_out(gw, receiver):
    env = {**receiver.env(), **FAST, "PGLEADER_ALERT_GROUP_INTERVAL": "2"}
    await gw.start(1, env=env)
    await gw.leader()
    await eventually(lambda: all(receiver.received[s] for s in SINKS))  # the transition
    await gw.query(
        "select gateway.raise_alert('flapping', null, 'tester', 'burst item ' || g)"
        "  from generate_series(1, 45) g"
    )
    await until(query_true(gw, ALL_DELIVERED), timeout=30)
    for sink in ("telegram", "slack"):
        texts = receiver.texts(sink)
        assert 2 <= len(texts) <= 5, texts  # 46 events: the transition, then 20 a message
        assert any("(grouped)" in text for text in texts)
        joined = "\n".join(texts) + "\n"
        missing = [n for n in range(1, 46) if f"burst item {n}\n" not in joined]
        assert missing == [], f"{sink} lacks {missing}"
    grouped = [b for b in receiver.bodies("webhook") if b["kind"] == "group"]
    assert grouped and all(len(b["items"]) > 1 for b in grouped)
    details = sorted(i["text"] for b in receiver.bodies("webhook") for i in b.get("items", [b])
                     if i["kind"] == "flapping")  # fmt: skip
    assert details == sorted(f"burst item {n}" for n in range(1, 46))
    group_ids = await gw.query(
        "select count(distinct group_id), count(*) filter (where group_id is null)"
        " from gateway.alert_deliveries d join gateway.alerts a on a.id = d.alert_id"
        " where d.sink = 'telegram'"
    )
    assert group_ids[0][0] >= 2 and group_ids[0][1] <= 1


async def test_a_flapping_cluster_is_told_in_a_few_messages_and_nothing_twice(gw, receiver):
    """Eight hand-overs in a row: the grouping is kept in the database, so it holds
    across leaders; a leader that resigns lets its message under way end first."""
    env = {**receiver.env("telegram", "webhook"), **FAST, "PGLEADER_ALERT_GROUP_INTERVAL": "3"}
    await gw.start(2, env=env)
    began = time.monotonic()
    led = "select count(*) = 1 from pgleader.leader where epoch = %s and leader is not null"
    for epoch in range(1, 9):
        await until(query_true(gw, led, epoch))
        status, answer = await gw.admin(await gw.leader(), "/coordinator/resign")
        assert (status, answer["epoch"]) == (200, epoch), answer
    await until(query_true(gw, led, 9))
    all_nine = (
        "select count(*) = 18 and bool_and(delivered_at is not null) from gateway.alert_deliveries"
    )
    await until(query_true(gw, all_nine), timeout=30)

    texts = receiver.texts("telegram")
    # Nine transitions; a sink gets one message per 3 s at most (and the first at once),
    # however long a loaded machine took over the eight hand-overs.
    assert 2 <= len(texts) <= 2 + (time.monotonic() - began) / 3, texts
    joined = "\n".join(texts)
    assert [n for n in range(1, 10) if f"(epoch {n})" not in joined] == []
    assert "ended: admin request" in joined  # how each epoch before ended
    assert any(b["kind"] == "group" for b in receiver.bodies("webhook"))
    assert await gw.scalar("select bool_or(repeat) from gateway.alert_deliveries") is False


async def test_no_stored_error_nor_log_line_carries_a_secret(gw, receiver):
    """Telegram's token is in its URL and the webhook's URL is its credential: every way
    a send can fail (no answer, an error answer, a refusal, a refused connection)
    leaves an error text behind, and none may quote them."""
    receiver.fail("telegram", "hang", "401", "401", "401")
    closed = f"http://127.0.0.1:{free_port()}{HOOK_PATH}"
    env = {**receiver.env("telegram", "slack"), **FAST, "PGLEADER_ALERT_TIMEOUT": "1",
           "PGLEADER_ALERT_WEBHOOK_URL": closed}  # fmt: skip
    (node,) = await gw.start(1, env=env)
    await gw.leader()
    given_up = "select count(*) = 1 from gateway.alert_deliveries where failed_at is not null"
    await until(query_true(gw, given_up), timeout=40)
    # Telegram refused the transition 3 times: given up there, and said so elsewhere.
    (row,) = await deliveries(gw, "telegram")
    assert row["last_error"] == "telegram: HTTP 401: Unauthorized" and row["refusals"] == 3
    assert row["maybe_sent"] is True and row["attempts"] == 4  # the first got no answer
    failed = await gw.alerts("alert_delivery_failed")
    assert failed == [
        "telegram refused this 3 time(s): HTTP 401: Unauthorized; given up there:"
        " transition gateway epoch 1"
    ]
    await eventually(lambda: got(receiver, "slack", "alert_delivery_failed"))
    # ... never to Telegram itself: no alert about an alert that cannot be delivered.
    rows = await gw.query(
        "select d.sink from gateway.alert_deliveries d join gateway.alerts a on a.id = d.alert_id"
        " where a.kind = 'alert_delivery_failed' order by d.sink"
    )
    assert rows == [("slack",), ("webhook",)]
    refused = (
        "select count(*) > 0 from gateway.alert_deliveries where sink = 'webhook' and attempts > 1"
    )
    await until(query_true(gw, refused), timeout=20)
    (hook, *_) = await deliveries(gw, "webhook")
    assert hook["last_error"] == "webhook: connection refused"

    await node.stop()
    texts = [r[0] for r in await gw.query("select last_error from gateway.alert_deliveries")]
    texts += [r[0] for r in await gw.query("select detail from gateway.alerts")]
    log = node.log_path.read_text()
    assert "alert delivery failed" in log and "no answer within 1 s" in log
    for secret in (TOKEN, HOOK_PATH, closed, SLACK_PATH, receiver.slack_url):
        assert secret not in log
        assert not [t for t in texts if t and secret in t]


async def test_a_delivery_under_way_when_the_leader_dies_is_sent_again_marked_as_a_repeat(
    gw, receiver
):
    receiver.fail("telegram", "hang")
    first, second = await gw.start(
        2, env={**receiver.env(), **FAST, "PGLEADER_ALERT_TIMEOUT": "30"}
    )
    dying = await gw.leader()
    other = second if dying is first else first
    # The Telegram message of its election is held at the sink; the others arrived.
    await eventually(lambda: bool(receiver.held["telegram"]))
    for sink in ("slack", "webhook"):
        await eventually(lambda sink=sink: got(receiver, sink, "(epoch 1)"))
    delivered = "select count(*) = 2 from gateway.alert_deliveries where delivered_at is not null"
    await until(query_true(gw, delivered))
    dying.signal(signal.SIGKILL)
    await dying.wait()
    assert await gw.leader() is other

    await until(query_true(gw, ALL_DELIVERED), timeout=30)
    texts = receiver.texts("telegram")
    repeated = [t for t in texts if f"{dying.instance_id} leads election gateway (epoch 1)" in t]
    assert len(repeated) == 1 and "(repeat: a previous leader may have sent" in repeated[0]
    rows = await gw.query(
        "select sink, epoch, repeat, attempts, claimed_by from gateway.alert_deliveries"
        " order by sink, epoch"
    )
    assert rows == [
        ("slack", 1, False, 1, dying.instance_id),
        ("slack", 2, False, 1, other.instance_id),
        ("telegram", 1, True, 2, other.instance_id),
        ("telegram", 2, False, 1, other.instance_id),
        ("webhook", 1, False, 1, dying.instance_id),
        ("webhook", 2, False, 1, other.instance_id),
    ]
    assert any(b.get("repeat") is False for b in receiver.bodies("webhook"))
    ended = f"{dying.instance_id} (epoch 1) ended: lost (its session ended)"
    assert got(receiver, "slack", ended) or got(receiver, "slack", "ended: evicted")


async def test_sinks_test_sends_to_each_sink_and_reports_per_sink(receiver):
    code, out, err = await pgleader_cli("sinks", "test", env=receiver.env())
    assert (code, err) == (0, "")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["sink"], r["outcome"]) for r in rows] == [(s, "delivered") for s in SINKS]
    for sink in SINKS:
        assert len(receiver.received[sink]) == 1 and got(receiver, sink, "test message")

    env = {**receiver.env(), "PGLEADER_SLACK_WEBHOOK_URL": f"http://127.0.0.1:{free_port()}/x"}
    receiver.fail("webhook", "404")
    code, out, err = await pgleader_cli("sinks", "test", env=env)
    assert code == 1, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows == [
        {"sink": "telegram", "outcome": "delivered", "detail": "message 2"},
        {"sink": "slack", "outcome": "failed", "detail": "connection refused"},
        {"sink": "webhook", "outcome": "refused", "detail": 'HTTP 404: {"error": "fault"}'},
    ]

    code, out, err = await pgleader_cli("sinks", "test")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        "pgleader sinks: error: no alert sink configured: set PGLEADER_TELEGRAM_TOKEN and"
        " PGLEADER_TELEGRAM_CHAT_ID, PGLEADER_SLACK_WEBHOOK_URL or PGLEADER_ALERT_WEBHOOK_URL"
    ]
    code, _, err = await pgleader_cli("sinks", "test", env={"PGLEADER_TELEGRAM_TOKEN": TOKEN})
    assert code == 2 and "PGLEADER_TELEGRAM_CHAT_ID" in err and TOKEN not in err


async def test_the_database_away_each_instance_tells_the_sinks_itself_and_when_it_is_back(
    own_server, tmp_path, receiver
):
    """No leader can deliver from a database that is away: the instance does, straight
    to the sinks, once per outage; and again once the database answers."""
    env = {**receiver.env(), **FAST, "PGLEADER_DB_DOWN_ALERT_AFTER": "2"}
    async with cluster(own_server.dsn, tmp_path) as gw:
        (node,) = await gw.start(1, env=env)
        await gw.leader()
        own_server.stop("fast")
        try:
            status, answer = await gw.post(node, signal_body())
            assert (status, answer["status"]) == (202, "spooled"), answer
            await eventually(
                lambda: all(got(receiver, s, "has not reached PostgreSQL") for s in SINKS)
            )
        finally:
            own_server.start()
        await eventually(lambda: all(got(receiver, s, "reaches PostgreSQL again") for s in SINKS))
    (down,) = [t for t in receiver.texts("telegram") if "has not reached PostgreSQL" in t]
    assert down.startswith(f"CRITICAL database_unreachable · pgleader {node.instance_id}"), down
    assert "keeps them in its spool (1 now)" in down, down
    (hook,) = [b for b in receiver.bodies("webhook") if b["kind"] == "database_unreachable"]
    assert (hook["instance"], hook["severity"]) == (node.instance_id, "critical"), hook
    (back,) = [b for b in receiver.bodies("webhook") if b["kind"] == "database_reachable"]
    assert back["severity"] == "info" and "its spool" in back["text"], back
    everything = json.dumps([receiver.texts(s) for s in SINKS]) + json.dumps(
        receiver.bodies("webhook")
    )
    assert TOKEN not in everything and SLACK_PATH not in everything and HOOK_PATH not in everything


async def test_the_outage_messages_come_in_order_whatever_the_timing(receiver):
    """In process, with a clock of the test's: the database back while the first message
    is still on its way (the sink holds it), then a sink that fails once; the second
    message follows the first, never instead of it, and is tried again."""
    now = [0.0]
    sinks = build_sinks(SinkSettings(alert_webhook_url=receiver.webhook_url))
    alarm = OutageAlarm(sinks, "gw9", after=5, send_timeout=10, retry=30, clock=lambda: now[0])
    try:
        receiver.fail("webhook", "hang")
        for now[0] in (0.0, 4.0):
            alarm.observe(reachable=False)
        assert alarm._sending is None  # not yet 5 s
        now[0] = 6.0
        alarm.observe(reachable=False)  # database_unreachable, held by the sink
        await eventually(lambda: len(receiver.held["webhook"]) == 1)
        now[0] = 7.0
        alarm.observe(reachable=True)  # back while the first is under way: waits
        receiver.fail("webhook", "500")
        receiver.release()
        await eventually(lambda: alarm.sent == ["database_unreachable"])
        alarm.observe(reachable=True)  # the second, refused once (500)
        await eventually(lambda: alarm._sending is not None and alarm._sending.done())
        assert alarm.sent == ["database_unreachable"]
        now[0] = 20.0
        alarm.observe(reachable=True)  # within the retry pause: nothing
        assert alarm._sending.done() and alarm.sent == ["database_unreachable"]
        now[0] = 40.0
        alarm.observe(reachable=True)
        await eventually(lambda: alarm.sent == ["database_unreachable", "database_reachable"])
        kinds = [b["kind"] for b in receiver.bodies("webhook")]
        assert kinds == ["database_unreachable", "database_reachable"], kinds
        assert "after 7 s" in receiver.bodies("webhook")[1]["text"]
        now[0] = 100.0
        alarm.observe(reachable=True)  # told once: no third message
        assert len(receiver.bodies("webhook")) == 2
    finally:
        await alarm.close()
