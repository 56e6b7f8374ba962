"""`make chaos`: randomized campaigns. ROUNDS, SEED, DURATION (s per round), FAULTS (per round).

make chaos ROUNDS=10 DURATION=180 FAULTS=24 SEED=1234

Each round trades eight instruments long and short on the fake OpenAlgo (a process
of its own, tests.chaos.broker), two of them futures rolled to their next contract
(the rollover fault), and ends with its book compared with the ledger. Of its four
instances the fourth runs with --no-lead; switchovers go to a live, a killed and the
no-lead instance (transfer_live, transfer_dead, transfer_ineligible). Its PostgreSQL is
a primary with a synchronous standby (db_failover promotes it, and a new standby is
made), its instances share a redis-server (redis_kill, redis_pause, redis_garbage).

The disk_full fault's small disk is a tmpfs mount as root, else (or with
PGLEADER_TEST_DISK=rlimit) a file-size limit on the instance (tests/diskfull.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tests.chaos.harness import campaign, summary


def main() -> int:
    rounds = int(os.environ.get("ROUNDS", "3"))
    seed = int(os.environ.get("SEED") or random.SystemRandom().randrange(1, 10**9))
    duration = float(os.environ.get("DURATION", "120"))
    faults = int(os.environ.get("FAULTS", "24"))
    print(f"chaos: ROUNDS={rounds} SEED={seed} DURATION={duration} FAULTS={faults}", flush=True)
    results = []
    for n in range(rounds):
        result = asyncio.run(campaign(seed + n, duration, faults))
        print(summary(result), flush=True)
        results.append(result)
    failed = [r["seed"] for r in results if r["violations"]]
    full = [r["disk_full"] for r in results]
    kinds = Counter(kind for r in results for _, kind, _ in r["faults"])
    in_doubt = Counter(name for r in results for _, name, _, _ in r["broker"]["in_doubt"])
    rolls = Counter(roll["state"] for r in results for roll in r["rollovers"]["rolls"])
    transfers = Counter(f"{t['kind']} {t['answer']}" for r in results for t in r["transfers"])
    elected = sorted(
        f["promote_to_elected_s"]
        for r in results
        for f in r["failovers"]
        if f["promote_to_elected_s"] is not None
    )
    failovers = sum(len(r["failovers"]) for r in results)
    waiters = [w for r in results for w in r["paused_waiters"]]
    waited = sorted(w["pause_to_elected_s"] for w in waiters if w["pause_to_elected_s"] is not None)
    planted = sum(len(r["redis"]["answered_duplicate"]) for r in results)
    print(
        f"\nall rounds: {sum(len(r['faults']) for r in results)} faults"
        f" ({', '.join(f'{k} x{v}' for k, v in sorted(kinds.items()))});"
        f" {sum(r['accepted'] for r in results)} signals answered 2xx"
        f" ({sum(r['spooled_answers'] for r in results)} spooled),"
        f" {sum(r['executed'] for r in results)} executed,"
        f" {sum(r['terminal'] for r in results)} terminal with an alert;"
        f" broker fills {sum(r['broker']['fills'] for r in results)};"
        f" in_doubt {sum(in_doubt.values())}"
        f" ({', '.join(f'{k} x{v}' for k, v in sorted(in_doubt.items())) or 'none'}), each"
        " with an alert or named a violation;"
        f" rolls {sum(rolls.values())}"
        f" ({', '.join(f'{k} x{v}' for k, v in sorted(rolls.items())) or 'none'});"
        f" transfers {sum(transfers.values())}"
        f" ({', '.join(f'{k} x{v}' for k, v in sorted(transfers.items())) or 'none'});"
        f" db_failovers {failovers}, promote -> elected"
        f" {', '.join(f'{s:.2f}' for s in elected) or 'none'} s;"
        f" paused waiters {len(waiters)} ({sum(w['granted_the_lock'] for w in waiters)} granted"
        f" the lock), pause -> another elected {', '.join(f'{s:.2f}' for s in waited) or 'none'} s;"
        f" signals answered 200 duplicate from Redis's planted entries {planted};"
        f" the no-lead instance answered 2xx"
        f" {sum(r['no_lead']['answered_2xx'] for r in results)}, led"
        f" {sum(len(r['no_lead']['led']) for r in results)} epochs;"
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
