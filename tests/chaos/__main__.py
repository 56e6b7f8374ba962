"""`make chaos`: randomized campaigns. ROUNDS, SEED, DURATION (s per round), FAULTS (per round).

make chaos ROUNDS=10 DURATION=180 FAULTS=20 SEED=1234

The disk_full fault's small disk is a tmpfs mount as root, else (or with
PGLEADER_TEST_DISK=rlimit) a file-size limit on the instance (tests/diskfull.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

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
    full = [r["disk_full"] for r in results]
    print(
        f"\nall rounds: {sum(len(r['faults']) for r in results)} faults"
        f" ({sum(d['faults'] for d in full)} disk_full), {sum(r['accepted'] for r in results)}"
        f" signals answered 2xx ({sum(r['spooled_answers'] for r in results)} spooled),"
        f" {sum(r['executed'] for r in results)} executed;"
        f" on the full disk {_total(full, 'full', '503')} answered 503,"
        f" {_total(full, 'full', '202 spooled')} spooled, once freed"
        f" {_total(full, 'freed', '202 spooled')} spooled;"
        f" {sum(len(r['violations']) for r in results)} violations"
    )
    out = Path("var/chaos-last-campaign.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(
        f"\n{len(results) - len(failed)}/{len(results)} rounds clean; replay a round with SEED=<seed> ROUNDS=1"
    )
    if failed:
        print(f"failing seeds: {failed}")
    return 1 if failed else 0


def _total(disk_full: list[dict[str, Any]], phase: str, answer: str) -> int:
    return sum(n for d in disk_full for a, n in d[phase].items() if a.startswith(answer))


if __name__ == "__main__":
    sys.exit(main())
