"""The outage spool keeps every signal it answered for, on a disk that really fills up.

In-process Spool tests on a small file system (tests/diskfull.py: a tmpfs as
root, else a file-size limit), then the whole path with real processes: a
gateway whose data directory fills up while PostgreSQL is down.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

import service.intake.spool as spool_module
from pgleader.embedded import EmbeddedPostgres
from pgleader.errors import ConfigError
from service.errors import SpoolError
from service.intake.signals import Signal, fingerprint, fingerprint_raw, parse_body, parse_dict
from service.intake.spool import Spool, Spooled
from tests.support.diskfull import SmallDisk
from tests.support.gateway import SECRET, GatewayProcess, cluster, until

T0 = datetime(2026, 1, 5, 9, 15, 1, tzinfo=UTC)
PRICE = "52000.123456789012345678901234"
STOP = "51499.99999999999999999999"


def make_signal(n: int, *, price: str = "52000.5", stop: str | None = None, pad: int = 0) -> Signal:
    """Parsed from JSON text, so decimals are exactly what is written here."""
    raw = (
        f'{{"type":"base_entry","instrument":"NSE:NIFTY","position":"Long_{n}","lots":1,'
        f'"price":{price}' + (f',"stop":{stop}' if stop else "") + ',"secret":"s3cret",'
        f'"timestamp":"2026-01-05T09:15:00Z","note":"{"x" * pad}"}}'
    )
    return parse_body(raw.encode(), now=T0).signal


async def append(spool: Spool, *signals: Signal) -> None:
    for s in signals:
        await spool.append(s, fingerprint(s), T0)


class Inbox:
    """What replay stores into: each fingerprint once, in order, like gateway.signals."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.stored: dict[str, Spooled] = {}
        self.calls = 0
        self.in_flight = self.most_in_flight = 0
        self.fail_at = fail_at

    async def __call__(self, item: Spooled) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise psycopg.OperationalError("database away")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)
        self.in_flight -= 1
        self.stored.setdefault(item.fingerprint, item)


class Alerts:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, kind: str, detail: str) -> None:
        self.sent.append((kind, json.loads(detail)))


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


@pytest.fixture
def disk() -> Iterator[SmallDisk]:
    """A small file system for this process (rlimit mode: a limit on this process)."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not death
    try:
        with SmallDisk() as small:
            small.watch()
            yield small
    finally:
        signal.signal(signal.SIGXFSZ, previous)


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


# -- appends: all or nothing -------------------------------------------------------


async def test_a_write_cut_short_by_a_full_disk_is_undone_and_nothing_answered_is_lost(
    disk, monkeypatch, logs
):
    spool = Spool(disk.path / "spool" / "gw1.jsonl")
    answered = [make_signal(1, pad=300), make_signal(2, pad=300)]
    await append(spool, *answered)
    before = spool.path.read_bytes()
    writes: list[tuple[int, int]] = []
    real_write = os.write

    def counting_write(fd: int, data: Any) -> int:
        written = real_write(fd, data)
        writes.append((written, len(data)))
        return written

    monkeypatch.setattr(os, "write", counting_write)
    disk.fill(leave=1000)

    with pytest.raises(SpoolError) as refused:
        await append(spool, make_signal(3, pad=20_000))

    assert (refused.value.reason, refused.value.full) == ("disk_full", True)
    assert any(written < asked for written, asked in writes), f"no short write: {writes}"
    assert spool.path.read_bytes() == before  # byte-identical: nothing torn left behind
    assert spool.can_accept()[0] is False
    assert spool.stats()["refused"] == 1
    assert [e["kind"] for e in logs if e["log_level"] == "critical"] == ["spool_full"]

    disk.free()
    later = make_signal(4, pad=20_000)
    await append(spool, later)  # the retry of a refused signal would go the same way
    answered.append(later)
    inbox = Inbox()
    assert await spool.replay(inbox) == 3
    assert list(inbox.stored) == [fingerprint(s) for s in answered]
    assert [item.signal for item in inbox.stored.values()] == answered
    assert spool_files(spool.directory) == []
    alerts = Alerts()
    await spool.flush_alerts(alerts)
    assert [(kind, detail["reason"]) for kind, detail in alerts.sent] == [
        ("spool_full", "disk_full")
    ]


async def test_a_torn_tail_is_terminated_then_quarantined_never_merged_with_the_next_record(
    tmp_path, logs
):
    path = tmp_path / "spool" / "gw1.jsonl"
    first, second = make_signal(1), make_signal(2)
    await append(Spool(path), first)
    whole = path.read_bytes()
    torn = whole[: len(whole) // 2]  # what a crash in the middle of an append leaves
    with path.open("ab") as f:
        f.write(torn)

    spool = Spool(path)  # the instance restarted
    assert spool.stats()["records"] == 2
    await append(spool, second)
    lines = path.read_bytes().split(b"\n")
    assert lines[:2] == [whole.rstrip(b"\n"), torn] and lines[3:] == [b""]
    assert json.loads(lines[2])["fingerprint"] == fingerprint(second)

    inbox = Inbox()
    assert await spool.replay(inbox) == 2
    assert list(inbox.stored) == [fingerprint(first), fingerprint(second)]
    assert (spool.directory / "quarantine" / "gw1.jsonl").read_bytes() == torn + b"\n"
    assert spool_files(spool.directory) == []
    assert spool.stats()["quarantined"] == 1
    critical = [e for e in logs if e["log_level"] == "critical"]
    assert [e["kind"] for e in critical] == ["spool_quarantined"]
    alerts = Alerts()
    assert await spool.flush_alerts(alerts) == 1
    ((kind, detail),) = alerts.sent
    assert kind == "spool_quarantined" and detail["lines"] == 1
    assert detail["quarantine"].endswith("quarantine/gw1.jsonl")


async def test_an_append_past_the_byte_cap_is_refused_and_alerts_once(tmp_path):
    spool = Spool(tmp_path / "gw1.jsonl", max_bytes=64 * 1024)
    accepted = 0
    with pytest.raises(SpoolError) as full:
        while True:
            await append(spool, make_signal(accepted, pad=5000))
            accepted += 1
    before = spool.path.read_bytes()
    with pytest.raises(SpoolError):
        await append(spool, make_signal(99, pad=5000))

    assert full.value.reason == "spool_full" and "--spool-max-bytes" in str(full.value)
    assert spool.path.read_bytes() == before
    assert [json.loads(line)["v"] for line in before.splitlines()] == [2] * accepted
    stats = spool.stats()
    assert (stats["records"], stats["refused"], stats["max_bytes"]) == (accepted, 2, 64 * 1024)
    assert stats["bytes"] <= 64 * 1024
    assert spool.can_accept()[0] is False
    alerts = Alerts()
    await spool.flush_alerts(alerts)
    assert [kind for kind, _ in alerts.sent] == ["spool_full"]  # one a minute, not one a request
    assert alerts.sent[0][1]["max_bytes"] == 64 * 1024


async def test_concurrent_appends_share_fsyncs_and_a_group_past_the_cap_goes_line_by_line(
    tmp_path, monkeypatch
):
    """Appends made while one is being written go together in the next write and
    fsync (an outage at hundreds of signals/s would otherwise queue behind one fsync
    each); a group the cap refuses whole is tried line by line: what fits is kept
    and answered, the rest refused, nothing half-written."""
    fsyncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", counting_fsync)
    spool = Spool(tmp_path / "gw1.jsonl", max_bytes=48 * 1024)  # 100 x 315 B, 3 x 5.3 KB
    signals = [make_signal(n) for n in range(100)]
    await asyncio.gather(*(spool.append(s, fingerprint(s), T0) for s in signals))
    kept = [json.loads(line)["fingerprint"] for line in spool.path.read_bytes().splitlines()]
    assert sorted(kept) == sorted(fingerprint(s) for s in signals)
    assert fsyncs < 10, f"{fsyncs} fsyncs for 100 concurrent appends"

    big = [make_signal(1000 + n, pad=5000) for n in range(10)]
    outcomes = await asyncio.gather(
        *(spool.append(s, fingerprint(s), T0) for s in big), return_exceptions=True
    )
    refused = [o for o in outcomes if isinstance(o, SpoolError)]
    taken = [s for s, o in zip(big, outcomes, strict=True) if o is None]
    assert refused and taken, outcomes  # some fit under the cap, the rest did not
    assert all(o.reason == "spool_full" for o in refused)
    lines = spool.path.read_bytes().splitlines()
    assert len(lines) == 100 + len(taken) and spool.path.stat().st_size <= 48 * 1024
    assert {json.loads(line)["fingerprint"] for line in lines[100:]} == {
        fingerprint(s) for s in taken
    }
    assert spool.stats()["records"] == len(lines)


async def test_can_accept_says_no_while_the_disk_is_full(disk):
    spool = Spool(disk.path / "spool" / "gw1.jsonl")
    await append(spool, make_signal(1))
    assert spool.can_accept() == (True, "ok")
    disk.fill(leave=0)
    ok, why = spool.can_accept()
    assert not ok and why
    disk.free()
    assert spool.can_accept() == (True, "ok")


# -- sizes without reading -------------------------------------------------------------


async def test_stats_know_bytes_and_records_without_reading_a_spool_file(tmp_path, monkeypatch):
    path = tmp_path / "spool" / "gw1.jsonl"
    spool = Spool(path)
    assert (spool.stats()["bytes"], spool.stats()["records"]) == (0, 0)
    await append(spool, make_signal(1), make_signal(2), make_signal(3))

    with monkeypatch.context() as m:

        def forbidden(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a spool file was opened")

        m.setattr(os, "open", forbidden)
        stats = spool.stats()
        assert spool.can_accept() == (True, "ok") and spool.waiting()
    assert (stats["bytes"], stats["records"]) == (os.stat(path).st_size, 3)
    assert stats["waiting_bytes"] == stats["bytes"]
    assert Spool(path).stats()["records"] == 3  # counted once, when the instance starts

    other = Spool(path.with_name("gw2.jsonl"))  # another instance on the same directory
    assert await other.replay(Inbox()) == 3
    assert (spool.stats()["bytes"], spool.stats()["records"]) == (0, 0)
    await append(spool, make_signal(4))
    assert (spool.stats()["bytes"], spool.stats()["records"]) == (os.stat(path).st_size, 1)
    assert await spool.replay(Inbox()) == 1
    assert (spool.stats()["bytes"], spool.stats()["records"]) == (0, 0)


# -- replay ----------------------------------------------------------------------------


async def test_a_spool_larger_than_a_chunk_is_replayed_chunk_by_chunk_and_stored_whole(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(spool_module, "_CHUNK_LINES", 7)
    monkeypatch.setattr(spool_module, "_CHUNK_BYTES", 4096)
    path = tmp_path / "spool" / "gw1.jsonl"
    spool = Spool(path)
    signals = [make_signal(n, pad=n * 37 % 900) for n in range(60)]
    await append(spool, *signals[:30])
    garbage = b"x" * 10_000  # one line longer than a chunk
    with path.open("ab") as f:
        f.write(garbage + b"\n")
    await append(spool, *signals[30:])
    assert path.stat().st_size > 5 * 4096

    inbox = Inbox()
    assert await spool.replay(inbox) == 60
    assert list(inbox.stored) == [fingerprint(s) for s in signals]
    assert inbox.most_in_flight <= 7
    assert (spool.directory / "quarantine" / "gw1.jsonl").read_bytes() == garbage + b"\n"
    assert spool_files(spool.directory) == []


async def test_appends_go_on_while_a_replay_waits_for_the_database(tmp_path):
    spool = Spool(tmp_path / "spool" / "gw1.jsonl")
    first, second = make_signal(1), make_signal(2)
    await append(spool, first)
    gate = asyncio.Event()
    stores = 0

    async def slow_store(item: Spooled) -> None:
        nonlocal stores
        stores += 1
        if stores == 2:  # the first was stored; the database is slow with the rest
            await gate.wait()

    replay = asyncio.create_task(spool.replay(slow_store))
    await until(lambda: _true(stores == 2 and not spool.path.exists()), timeout=5)
    async with asyncio.timeout(1):
        await append(spool, second)  # not blocked by the replay
    gate.set()
    assert await replay == 1
    inbox = Inbox()
    assert await spool.replay(inbox) == 1
    assert list(inbox.stored) == [fingerprint(second)]


async def test_a_replay_cut_short_keeps_every_line_and_the_next_one_finishes_it(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(spool_module, "_CHUNK_LINES", 1)
    path = tmp_path / "spool" / "gw1.jsonl"
    spool = Spool(path)
    signals = [make_signal(n) for n in range(3)]
    await append(spool, signals[0])
    with path.open("ab") as f:
        f.write(b'{"v": 2, "torn\n')
    await append(spool, *signals[1:])
    before = path.read_bytes()

    with pytest.raises(psycopg.OperationalError):  # the database is down: nothing moves
        await spool.replay(Inbox(fail_at=1))
    assert path.read_bytes() == before
    # it goes away in the middle of the replay: the file is kept, renamed
    with pytest.raises(psycopg.OperationalError):
        await spool.replay(Inbox(fail_at=3))
    assert not path.exists() and len(list(spool.directory.glob("*.replaying.jsonl"))) == 1

    inbox = Inbox()
    assert await spool.replay(inbox) == 2  # resumed where the stored lines end
    assert (spool.directory / "quarantine" / "gw1.jsonl").read_bytes() == b'{"v": 2, "torn\n'
    assert spool_files(spool.directory) == []
    again = Inbox()
    await Spool(path).replay(again)
    assert again.stored == {}


async def test_decimals_come_back_from_the_spool_exactly_and_the_secret_never_goes_in(tmp_path):
    spool = Spool(tmp_path / "spool" / "gw1.jsonl")
    exact = make_signal(1, price=PRICE, stop=STOP)
    await append(spool, exact)
    assert b"s3cret" not in spool.path.read_bytes()
    inbox = Inbox()
    await spool.replay(inbox)
    (item,) = inbox.stored.values()
    assert item.signal == exact and item.received_at == T0
    assert (str(item.signal.price), str(item.signal.stop)) == (PRICE, STOP)


async def test_records_spooled_before_the_upgrade_still_replay(tmp_path):
    body = {
        "type": "BASE_ENTRY", "instrument": "BANK_NIFTY", "position": "Long_old", "lots": 5,
        "price": 52000.5, "stop": 51500, "timestamp": "2026-01-05T09:15:00Z",
    }  # fmt: skip
    path = tmp_path / "spool" / "old-instance.jsonl"
    path.parent.mkdir()
    old = {"body": body, "fingerprint": fingerprint_raw(body), "received_at": T0.isoformat()}
    path.write_text(json.dumps(old) + "\n")
    inbox = Inbox()
    assert await Spool(path.with_name("new-instance.jsonl")).replay(inbox) == 1
    assert list(inbox.stored.values()) == [
        Spooled(parse_dict(body, now=T0).signal, fingerprint_raw(body), T0)
    ]


async def test_alerts_wait_for_the_database_in_a_bounded_queue(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "_CHUNK_LINES", 1)
    path = tmp_path / "spool" / "gw1.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"".join(b"not json %d\n" % n for n in range(150)))
    spool = Spool(path)
    assert await spool.replay(Inbox()) == 0
    assert (spool.stats()["quarantined"], spool.stats()["alerts_queued"]) == (150, 100)
    assert spool.stats()["alerts_dropped"] == 50

    sent = Alerts()

    async def database_goes_away(kind: str, detail: str) -> None:
        if len(sent.sent) == 10:
            raise psycopg.OperationalError("database away")
        await sent(kind, detail)

    with pytest.raises(psycopg.OperationalError):
        await spool.flush_alerts(database_goes_away)
    assert spool.stats()["alerts_queued"] == 90
    assert await spool.flush_alerts(sent) == 91
    assert [kind for kind, _ in sent.sent[-2:]] == ["spool_quarantined", "spool_alerts_dropped"]
    assert sent.sent[-1][1] == {"dropped": 50}
    assert await spool.flush_alerts(sent) == 0


# -- the data directory at start -------------------------------------------------------


def test_an_unusable_data_directory_fails_at_start_in_one_line(disk, tmp_path):
    spool = Spool(disk.path / "spool" / "gw1.jsonl")
    spool.check_directory()
    disk.fill(leave=0)
    with pytest.raises(ConfigError) as full:
        spool.check_directory()
    disk.free()
    with pytest.raises(ConfigError) as short:
        spool.check_directory(min_free=1 << 60)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError) as blocked:
        Spool(tmp_path / "file" / "spool" / "gw1.jsonl").check_directory()

    for error, where in [(full, spool.directory), (short, spool.directory), (blocked, None)]:
        message = str(error.value)
        assert "\n" not in message and "spool directory" in message, message
        assert where is None or str(where) in message
    assert "bytes free" in str(short.value)
    assert [p.name for p in spool.directory.iterdir()] == []  # the probe is gone


# -- the whole path, real processes ----------------------------------------------------


def exact_body(position: str) -> bytes:
    """A webhook body with decimals no float can hold, and room enough to need
    fresh blocks of the disk."""
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f'{{"type":"BASE_ENTRY","instrument":"BANK_NIFTY","position":"{position}","lots":1,'
        f'"price":{PRICE},"stop":{STOP},"timestamp":"{at}","secret":"{SECRET}",'
        f'"note":"{"n" * 6000}"}}'
    ).encode()


async def test_a_full_disk_during_an_outage_answers_503_and_loses_no_signal_answered_2xx(
    own_server: EmbeddedPostgres, tmp_path: Path
):
    with SmallDisk() as disk:
        async with cluster(own_server.dsn, disk.path) as c:
            node = GatewayProcess(own_server.dsn, "gw1", disk.path, log_dir=tmp_path)
            c.nodes[node.instance_id] = node
            await node.start()
            assert node.proc is not None
            disk.watch(node.proc.pid)
            await c.leader()

            async def post_all(bodies: list[bytes]) -> list[tuple[int, str]]:
                answers = await asyncio.gather(*(c.post(node, body) for body in bodies))
                return [(status, answer["status"]) for status, answer in answers]

            def spooled_lines() -> list[bytes]:
                return sorted(
                    line
                    for f in spool_files(disk.path / "spool")
                    for line in f.read_bytes().splitlines()
                )

            disk.fill(leave=0)  # /ready tells the load balancer before a signal is refused
            assert await c.get(node, "/ready") == (503, {"status": "spool_unavailable"})
            disk.free()
            assert (await c.get(node, "/ready"))[0] == 200

            own_server.stop("fast")
            first = [exact_body(f"Long_disk_{n}") for n in range(3)]
            assert await post_all(first) == [(202, "spooled")] * 3
            before = spooled_lines()
            assert len(before) == 3

            disk.fill(leave=1000)
            refused = [exact_body(f"Long_disk_{n}") for n in range(3, 5)]
            assert await post_all(refused) == [(503, "spool_full")] * 2
            assert spooled_lines() == before  # nothing torn, nothing half-written
            assert all(json.loads(line)["v"] == 2 for line in before)

            disk.free()
            assert await post_all(refused) == [(202, "spooled")] * 2  # TradingView's retries
            answered = first + refused

            own_server.start()
            positions = [json.loads(body)["position"] for body in answered]

            async def all_stored() -> bool:
                n = await c.scalar("select count(*) from gateway.signals")
                return bool(n == len(answered))

            await until(all_stored, timeout=30)
            rows = await c.query(
                "select id, position, price::text, stop::text from gateway.signals order by id"
            )
            assert sorted(r[1] for r in rows) == sorted(positions)  # each exactly once
            assert {(r[2], r[3]) for r in rows} == {(PRICE, STOP)}
            ids = [r[0] for r in rows]
            assert set((await c.settled(ids)).values()) == {"executed"}
            assert await c.broker_requests_per_signal() == dict.fromkeys(ids, 1)
            assert spooled_lines() == []
            assert not (disk.path / "spool" / "quarantine").exists()

            async def alerted() -> bool:
                kinds = await c.query("select kind from gateway.alerts where kind like 'spool%'")
                return bool(kinds)

            await until(alerted, timeout=10)
            kinds = await c.query("select kind from gateway.alerts where kind like 'spool%'")
            assert kinds == [("spool_full",)]  # one alert for the outage, not one a request


async def _true(value: bool) -> bool:
    return value


def test_instances_sharing_a_data_dir_can_create_its_spool_directory_together(
    tmp_path, monkeypatch
):
    """Two instances started side by side on one data dir: the second may find the
    directory missing, then made by the first before its own mkdir."""
    spool = Spool(tmp_path / "spool" / "gw2.jsonl")
    spool.directory.mkdir()  # the other instance got there first...
    real_exists = Path.exists
    monkeypatch.setattr(
        Path, "exists", lambda p: False if p == spool.directory else real_exists(p)
    )  # ...just after this one looked
    spool.check_directory()
