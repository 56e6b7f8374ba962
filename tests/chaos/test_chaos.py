"""The short, fixed-seed chaos campaign that `make test` runs (`make chaos` runs long ones),
and the checker's no-loss rule on a made-up history."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from tests.chaos.checker import check
from tests.chaos.harness import DISK_FULL_NODE, FAULTS, History, Request, campaign, summary


async def test_short_campaign_keeps_both_promises_under_every_fault_kind():
    result = await campaign(seed=20261123, duration=40, faults=len(FAULTS), rate=20)
    print(summary(result))
    assert {kind for _, kind, _ in result["faults"]} >= set(FAULTS) - {
        "kill",
        "pause",
        "partition",
        "sigterm",
    }
    assert result["accepted"] > 100 and result["executed"] > 0
    disk_full = result["disk_full"]
    assert any(a.startswith("503") for a in disk_full["full"]), "the full disk refused nothing"
    assert disk_full["freed"].get("202 spooled"), "nothing spooled once the disk was freed"
    assert result["violations"] == [], summary(result)


async def test_checker_names_a_signal_answered_spooled_that_never_reached_the_inbox(
    dsn: str, tmp_path: Path
):
    """The disk_full fault's failure: a 202 `spooled` whose record was torn on a full disk.
    A 503 on the same disk promised nothing and is no loss."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / f"{DISK_FULL_NODE}.jsonl").write_text('{"body":{},"fingerprint":"f00d')  # torn
    node = SimpleNamespace(data_dir=tmp_path, log_path=tmp_path / f"{DISK_FULL_NODE}.log")
    history = History(seed=1)
    now = time.monotonic()
    history.requests += [
        Request(now, DISK_FULL_NODE, "f00d", 202, {"status": "spooled"}, now),
        Request(now, DISK_FULL_NODE, "beef", 503, {"status": "unavailable"}, now),
    ]
    fake = SimpleNamespace(
        seed=1,
        server=SimpleNamespace(dsn=dsn),
        workdir=tmp_path,
        nodes={DISK_FULL_NODE: node},
        history=history,
        disk=None,
    )

    result = await check(fake, quiet=0)  # type: ignore[arg-type]

    lost = [v for v in result["violations"] if v.startswith("no-loss")]
    assert len(lost) == 1 and "f00d answered 202" in lost[0], result["violations"]
    assert str(spool / f"{DISK_FULL_NODE}.jsonl") in lost[0]  # where its remains are
    assert result["spooled_answers"] == 1 and result["accepted"] == 1
