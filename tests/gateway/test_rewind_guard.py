"""The rewind guard (service/watermark.py): a database that went back in time after
a reconnection halts trading until an operator resumes it on purpose.

The database really goes back in time: the suite's own server is stopped, its data
directory copied, started again; a switchover (a new epoch) and a signal answered
as stored follow; then the server is stopped at once and the old copy put back, as
a standby promoted without the last commits would be. Real `pgleader serve`
processes trading at the fake OpenAlgo, whose order book outlives the rewind: no
order may reach it from the rewound database until `pgleader resume --after-rewind`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from pgleader.embedded import EmbeddedPostgres
from service.watermark import Watermark
from tests.support.gateway import futures, pgleader_cli, query_true, trading_at, until

pytestmark = pytest.mark.asyncio(loop_scope="function")

TRADED = futures("BEFORE", "LOST", "AFTER", "HELD")


def _copy(source: Path, target: Path) -> None:
    """A copy of a stopped server's data directory, owner and modes kept."""
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)


async def test_a_database_back_in_time_halts_trading_until_resumed_after_the_rewind(
    own_server: EmbeddedPostgres, tmp_path: Path
):
    async with trading_at(own_server.dsn, tmp_path, TRADED, nodes=2) as t:
        status, first = await t.post(instrument="BEFORE", lots=1)
        assert (status, first["status"]) == (200, "executed"), first

        # The copy the database will go back to.
        saved = tmp_path / "pg-before"
        own_server.stop("fast")
        _copy(own_server.data_dir, saved)
        own_server.start()
        leader = await t.gw.leader()

        # After the copy: a new epoch (a switchover) and a signal answered as stored.
        other = next(n for n in t.gw.nodes.values() if n is not leader)

        async def transferred() -> bool:  # refused until the target is back after the restart
            status, moved = await t.gw.admin(
                leader, "/coordinator/transfer", {"to": other.instance_id}
            )
            assert status in (200, 409), moved
            return status == 200

        await until(transferred, 30)
        led = "select leader = %s from pgleader.leader where election = 'gateway'"
        await until(query_true(t.gw, led, other.instance_id))
        status, lost = await t.post(other, instrument="LOST", lots=2)
        assert (status, lost["status"]) == (200, "executed"), lost
        orders_before_rewind = len(t.fake.orders)

        # Back in time: the newer commits are gone.
        own_server.stop("immediate")
        _copy(saved, own_server.data_dir)
        own_server.start()

        await until(query_true(t.gw, "select mode = 'rewound' from gateway.trading_halt"), 30)
        why = await t.gw.scalar("select reason from gateway.trading_halt")
        assert "lacks" in why, why
        assert await t.gw.alerts("database_rewound"), "no database_rewound alert"

        async def says_why() -> bool:  # once its pool is back and its sweep read the switch
            return await t.gw.get(other, "/ready") == (200, {"status": "database_rewound"})

        await until(says_why, 30)

        # Signals are taken and kept, none is executed.
        status, after = await t.post(other, instrument="AFTER", lots=1)
        assert status == 202, after
        status, nothing_changed = await t.gw.admin(other, "/admin/resume")
        assert (status, nothing_changed["status"]) == (409, "database_rewound"), nothing_changed
        code, out, err = await pgleader_cli("resume", "--dsn", own_server.dsn)
        assert code == 1 and out == "", (code, out, err)
        assert err.count("\n") == 1 and "--after-rewind" in err, err
        code, out, err = await pgleader_cli("halt", "--reason", "x", "--dsn", own_server.dsn)
        assert code == 1, (code, out, err)
        assert await t.status(int(after["signal_id"])) == "pending"
        assert len(t.fake.orders) == orders_before_rewind

        # A signal the database held from before the rewind and still shows pending (the
        # lost commits may have executed it): here one taken now, its receipt put back.
        status, held = await t.post(other, instrument="HELD", lots=1)
        assert status == 202, held
        held_id = int(held["signal_id"])
        await t.gw.query(
            "update gateway.signals set received_at = received_at - interval '1 hour'"
            " where id = %s", held_id,
        )  # fmt: skip
        code, out, err = await pgleader_cli("resume", "--open", "end", "--dsn", own_server.dsn)
        assert code == 2 and err.count("\n") == 1 and "--after-rewind" in err, (code, err)

        # The operator reconciled with the broker and resumes on purpose: refused until it
        # says what becomes of the held signal (its reconciliation: never sent, so requeue).
        code, out, err = await pgleader_cli("resume", "--after-rewind", "--dsn", own_server.dsn)
        assert code == 1 and out == "" and err.count("\n") == 1, (code, out, err)
        assert f"(ids {held_id})" in err, err
        assert await t.gw.scalar("select mode from gateway.trading_halt") == "rewound"
        code, out, err = await pgleader_cli(
            "resume", "--after-rewind", "--open", "requeue", "--dsn", own_server.dsn
        )
        assert code == 0, err
        assert json.loads(out) == {
            "trading": "running", "before": "rewound", "reason": None,
            "open_signals": [held_id], "open": "requeue",
        }  # fmt: skip
        await t.reaches(int(after["signal_id"]), "executed")
        await t.reaches(held_id, "executed")
        assert t.orders("AFTER") and t.orders("HELD")
        assert len(t.fake.orders) == orders_before_rewind + 2


async def test_the_watermark_checks_what_it_saw_by_identity_not_by_number(db, tmp_path: Path):
    """It passes a database that holds what it saw; it finds an epoch held by
    another leader and a signal id with another fingerprint missing; it remembers
    across a restart (its file); it starts afresh on another database."""
    await db.execute("insert into pgleader.election (name) values ('w') on conflict do nothing")
    await db.execute(
        "insert into pgleader.leadership_history (election, epoch, instance_id, acquired_at)"
        " values ('w', 7, 'gw1', now())"
    )
    path = tmp_path / "watermark" / "gw2.json"
    mark = Watermark(path, "w", "gw2")
    assert await mark.check(db) is None  # first sight: this database is the one
    mark.saw_epoch(7, "gw1")
    assert await mark.check(db) is None
    cur = await db.execute(
        "select acquired_at from pgleader.leadership_history where election = 'w' and epoch = 7"
    )
    (started,) = await cur.fetchone() or (None,)
    mark.saw_epoch(7, "gw1", started)  # the sweep read the term's start
    assert mark.mark.acquired_at == started.isoformat()
    assert await mark.check(db) is None
    # The same number and leader, another term: one re-issued after a rewind.
    reissued = Watermark(tmp_path / "other.json", "w", "gw2")
    reissued.mark = replace(mark.mark, acquired_at=(started - timedelta(seconds=1)).isoformat())
    why = await reissued._missing(db)
    assert why is not None and "epoch 7 of gw1 begun" in why, why

    mark.saw_epoch(7, "gw9")  # not higher: ignored
    mark.saw_epoch(8, "gw3")  # a higher epoch this database never had
    mark.save()
    again = Watermark(path, "w", "gw2")  # a restart reads the file
    why = await again._missing(db)
    assert why is not None and "epoch 8 of gw3" in why, why

    again.mark.epoch, again.mark.leader, again.mark.acquired_at = 7, "gw1", None
    again.answered(123456789, "f" * 64)  # an id this database never stored
    why = await again._missing(db)
    assert why is not None and "signal 123456789" in why, why
    old = Watermark(path, "w", "gw2", retention_days=1)
    old.mark = again.mark
    old.mark.received_at = "2020-01-01T00:00:00+00:00"  # retention may have deleted it
    assert await old._missing(db) is None

    again.mark.database = "another database"
    assert await again.check(db) is None  # a new database: a new watermark
    assert again.mark.epoch is None and again.mark.signal_id is None
    assert (await (await db.execute("select mode from gateway.trading_halt")).fetchone()) == (
        "running",
    )
