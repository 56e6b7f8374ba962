"""A user's `on_transition` callback is called, never trusted: whatever it does, the
election goes on."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from pgleader import Elector, Timings, Transition

FAST = Timings(heartbeat=0.2, lease=0.5, evict_after=1.0)


@pytest.fixture
async def loop_errors() -> list[dict[str, Any]]:
    """What the event loop reports to its exception handler, e.g. "Task exception was
    never retrieved" (a log line, not a warning: filterwarnings=error would miss it)."""
    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
    return reported


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def raising_callback(t: Transition) -> None:
    raise RuntimeError(f"user bug on {t.kind}")


async def raising_coroutine(t: Transition) -> None:
    await asyncio.sleep(0)
    raise RuntimeError(f"async user bug on {t.kind}")


async def lead_resign_lead(elector: Elector) -> list[int]:
    """Become leader, resign, become leader again; the epochs led."""
    epochs = [await elector.wait_for_leadership(10)]
    assert await elector.resign("round", timeout=5)
    epochs.append(await elector.wait_for_leadership(10))
    return epochs


@pytest.mark.parametrize("callback", [raising_callback, raising_coroutine])
async def test_a_raising_callback_is_logged_and_the_elector_leads_again(
    dsn, callback, logs, loop_errors
):
    seen: list[str] = []
    elector = Elector(dsn, "main", instance_id="cb", timings=FAST, resign_cooldown=0.05)
    elector.on_transition(callback)
    elector.on_transition(lambda t: seen.append(t.kind))  # registered after the bad one
    await elector.start()
    try:
        assert await lead_resign_lead(elector) == [1, 2]
        await elector.stop()
        # a fresh campaign after a restart works too
        await elector.start()
        assert await elector.wait_for_leadership(10) == 3
    finally:
        await elector.stop()
    gc.collect()
    await asyncio.sleep(0)

    assert seen == ["elected", "resigned", "elected", "resigned", "elected", "resigned"]
    failures = [e for e in logs if e["event"] == "transition callback failed"]
    assert {f["transition"] for f in failures} == {"elected", "resigned"}
    assert all(f["callback"].endswith(callback.__qualname__) for f in failures)
    assert all("user bug on" in f["error"] for f in failures)
    assert loop_errors == []


async def test_a_slow_callback_never_holds_up_the_election(dsn, loop_errors):
    release = asyncio.Event()
    started: list[str] = []

    async def slow(t: Transition) -> None:
        started.append(t.kind)
        await release.wait()

    elector = Elector(dsn, "main", instance_id="slow", timings=FAST, resign_cooldown=0.05)
    elector.on_transition(slow)
    await elector.start()
    try:
        assert await asyncio.wait_for(lead_resign_lead(elector), 10) == [1, 2]
        assert started == ["elected", "resigned", "elected"]
        release.set()
    finally:
        await elector.stop()
    assert loop_errors == []


async def test_stop_ends_callbacks_that_outlive_it(dsn, loop_errors, logs):
    """A coroutine callback still running after stop() is cancelled: nothing the
    elector started outlives it."""
    forever = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []

    async def hang(t: Transition) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        await forever.wait()

    elector = Elector(dsn, "main", instance_id="hang", timings=FAST)
    elector.on_transition(hang)
    await elector.start()
    await elector.wait_for_leadership(10)
    await elector.stop()
    assert tasks and all(t.done() for t in tasks)
    assert any(e["event"] == "transition callbacks cancelled at stop" for e in logs)
    assert loop_errors == []
