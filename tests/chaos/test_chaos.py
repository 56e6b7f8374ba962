"""The short, fixed-seed chaos campaign that `make test` runs (`make chaos` runs long ones)."""

from __future__ import annotations

from tests.chaos.harness import FAULTS, campaign, summary


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
    assert result["violations"] == [], summary(result)
