"""`make chaos`: randomized campaigns. ROUNDS, SEED, DURATION (s per round), FAULTS (per round).

make chaos ROUNDS=10 DURATION=180 FAULTS=20 SEED=1234
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path

from tests.chaos.harness import campaign, summary


def main() -> int:
    rounds = int(os.environ.get("ROUNDS", "3"))
    seed = int(os.environ.get("SEED") or random.SystemRandom().randrange(1, 10**9))
    duration = float(os.environ.get("DURATION", "120"))
    faults = int(os.environ.get("FAULTS", "12"))
    print(f"chaos: ROUNDS={rounds} SEED={seed} DURATION={duration} FAULTS={faults}", flush=True)
    results = []
    for n in range(rounds):
        result = asyncio.run(campaign(seed + n, duration, faults))
        print(summary(result), flush=True)
        results.append(result)
    failed = [r["seed"] for r in results if r["violations"]]
    out = Path("var/chaos-last-campaign.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(
        f"\n{len(results) - len(failed)}/{len(results)} rounds clean; replay a round with SEED=<seed> ROUNDS=1"
    )
    if failed:
        print(f"failing seeds: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
