"""A switchover over HTTP (POST /coordinator/transfer), and an instance that may not
lead (--no-lead), with real `pgleader serve` processes."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from tests.support.gateway import cluster, signal_body, until


async def test_transfer_hands_the_lead_to_the_named_instance_and_no_lead_never_leads(
    dsn: str, tmp_path: Path
) -> None:
    async with cluster(dsn, tmp_path) as gw:
        (gw1,) = await gw.start(1)
        assert await gw.leader() is gw1
        (gw2,) = await gw.start(1, env={"PGLEADER_PRIORITY": "5"})
        (gw3,) = await gw.start(1, "--no-lead")

        async def registered() -> bool:  # both followers beat on their election sessions
            query = (
                "select count(*) from pgleader.instances i join pg_stat_activity a"
                " on a.pid = i.backend_pid where i.instance_id in ('gw2', 'gw3')"
            )
            return await gw.scalar(query) == 2

        await until(registered, timeout=15)
        status, view = await gw.get(gw3, "/coordinator/leader")
        assert (status, view["eligible"], view["priority"], view["is_leader"]) == (
            200, False, 0, False,
        )  # fmt: skip
        status, view = await gw.get(gw2, "/coordinator/leader")
        assert (view["eligible"], view["priority"]) == (True, 5)
        assert await gw.query(
            "select instance_id, eligible, priority from pgleader.instances order by 1"
        ) == [("gw1", True, 0), ("gw2", True, 5), ("gw3", False, 0)]
        status, snapshot = await gw.get(gw1, "/status/snapshot")  # what the status page shows
        assert {i["instance_id"]: (i["eligible"], i["priority"]) for i in snapshot["instances"]} == {
            "gw1": (True, 0), "gw2": (True, 5), "gw3": (False, 0),
        }  # fmt: skip

        # refusals: each one line, the leader unchanged
        for node, body, token, expected in [
            (gw1, {"to": "gw2"}, None, (401, "unauthorized")),
            (gw2, {"to": "gw1"}, "admin", (409, "not_leader")),
            (gw1, {"to": "gw3"}, "admin", (409, "refused")),
            (gw1, {"to": "nope"}, "admin", (409, "refused")),
            (gw1, {"to": "gw1"}, "admin", (409, "refused")),
            (gw1, {"to": ""}, "admin", (400, "invalid")),
            (gw1, {"to": "gw2", "now": True}, "admin", (400, "invalid")),
        ]:
            kwargs = {} if token else {"token": None}
            status, answer = await gw.admin(node, "/coordinator/transfer", body, **kwargs)
            assert (status, answer["status"]) == expected, (body, answer)
            assert "\n" not in answer["error"]
        status, answer = await gw.admin(gw1, "/coordinator/transfer", {"to": "gw3"})
        assert answer["error"] == "instance gw3 may not lead (it runs with --no-lead)"
        assert await gw.leader() is gw1

        # switchovers back and forth, timed from the request to the target's election
        took = []
        leader, other = gw1, gw2
        for _ in range(4):

            async def follows(name: str = other.instance_id) -> bool:  # on its session of now
                query = (
                    "select count(*) from pgleader.instances i join pg_stat_activity a"
                    " on a.pid = i.backend_pid where i.instance_id = %s and not i.is_leader"
                    " and i.last_heartbeat > coalesce((select max(released_at) from"
                    " pgleader.leadership_history where instance_id = %s), '-infinity')"
                )
                return await gw.scalar(query, name, name) == 1

            await until(follows, timeout=10)
            epoch = await gw.scalar("select epoch from pgleader.election")
            asked = time.monotonic()
            status, answer = await gw.admin(
                leader, "/coordinator/transfer", {"to": other.instance_id}
            )
            assert (status, answer) == (
                200, {"status": "transferred", "epoch": epoch, "to": other.instance_id},
            )  # fmt: skip

            async def elected(target: str = other.instance_id, epoch: int = epoch) -> bool:
                rows = await gw.query(
                    "select instance_id from pgleader.leadership_history where epoch = %s",
                    epoch + 1,
                )
                return rows == [(target,)]

            await until(elected, timeout=10)
            took.append(time.monotonic() - asked)
            assert await gw.leader() is other
            leader, other = other, leader
        print(f"POST /coordinator/transfer -> target elected: median"
              f" {statistics.median(took) * 1000:.0f} ms over {len(took)}")  # fmt: skip

        # the no-lead instance takes webhooks; the leader executes them
        status, answer = await gw.post(gw3, signal_body())
        assert (status, answer["status"]) == (202, "accepted"), answer
        statuses = await gw.settled([answer["signal_id"]])
        assert statuses == {answer["signal_id"]: "executed"}

        # alone, it still takes webhooks, and never leads
        await gw1.stop()
        await gw2.stop()
        status, answer = await gw.post(gw3, signal_body())
        assert (status, answer["status"]) == (202, "accepted"), answer
        _, before = await gw.get(gw3, "/coordinator/leader")
        beats = before["metrics"]["heartbeats_ok"]

        async def outlived_evict_after() -> bool:  # 8 beats of 0.2 s: any follower would lead
            _, view = await gw.get(gw3, "/coordinator/leader")
            return view["metrics"]["heartbeats_ok"] >= beats + 8

        await until(outlived_evict_after, timeout=15)
        _, view = await gw.get(gw3, "/coordinator/leader")
        assert (view["is_leader"], view["metrics"]["times_elected"]) == (False, 0)
        assert view["leader"]["leader"] is None and not view["leader"]["lock_held"]
        stored = await gw.scalar(
            "select status from gateway.signals where id = %s", answer["signal_id"]
        )
        assert stored == "pending"
