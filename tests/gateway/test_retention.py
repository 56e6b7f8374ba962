"""Retention's throttle against a real database: a run deletes for its time budget
at most and leaves the rest to the next run; batch sizes adapt within bounds; a
deposed leader's run deletes nothing."""

from __future__ import annotations

import pytest

from pgleader.errors import Fenced
from pgleader.jobs import JobRun
from service.jobs.maintenance import Retention

_OLD_SIGNALS = """
insert into gateway.signals
    (fingerprint, type, instrument, position, side, lots, price, signal_at, payload,
     received_by, received_at, status, claimed_epoch, claimed_by, claimed_at, finished_at,
     updated_at)
select 'old:' || g, 'BASE_ENTRY', 'OLD', 'Long_1', 'long', 1, 100, t, '{}'::jsonb,
       'test', t, 'executed', 1, 'test', t, t, t
  from generate_series(1, %s) g, lateral (select now() - interval '3 days') x (t)
"""


@pytest.mark.asyncio(loop_scope="function")
async def test_a_run_stops_at_its_budget_and_the_next_run_goes_on(executor_for, db):
    executor = await executor_for()
    await db.execute(_OLD_SIGNALS, [450])
    run = JobRun("retention", "gateway", executor.elector.epoch, "new")

    first = await Retention(executor.pool, 1, batch=100, budget=0.0).run(run)

    assert first.startswith("100 signal(s) older than 1 day(s) deleted; more remain"), first
    left = (await (await db.execute("select count(*) from gateway.signals")).fetchone())[0]
    assert left == 350
    rest = await Retention(executor.pool, 1, batch=100).run(run)
    assert rest == "350 signal(s) older than 1 day(s) deleted", rest
    left = (await (await db.execute("select count(*) from gateway.signals")).fetchone())[0]
    assert left == 0


@pytest.mark.asyncio(loop_scope="function")
async def test_a_deposed_leaders_run_deletes_nothing(executor_for, db):
    executor = await executor_for()
    await db.execute(_OLD_SIGNALS, [10])
    stale = JobRun("retention", "gateway", executor.elector.epoch - 1, "new")

    with pytest.raises(Fenced):
        await Retention(executor.pool, 1).run(stale)

    left = (await (await db.execute("select count(*) from gateway.signals")).fetchone())[0]
    assert left == 10


def test_batches_aim_at_20_ms_within_bounds_and_at_most_double():
    retention = Retention(None, 1)  # type: ignore[arg-type]  # sizing only
    assert retention._next_batch(1000, 0.04) == 500  # twice too slow: half
    assert retention._next_batch(1000, 0.016) == 1250
    assert retention._next_batch(500, 0.001) == 1000  # at most double
    assert retention._next_batch(1500, 0.005) == 2000  # at most MAX_BATCH
    assert retention._next_batch(200, 10.0) == 50  # at least MIN_BATCH
