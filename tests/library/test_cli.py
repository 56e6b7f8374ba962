"""The pgleader command as a user runs it: one-line errors, no tracebacks, JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pgleader import ConfigError, Timings


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("PGLEADER_DSN", "DATABASE_URL")}
    return subprocess.run(
        [sys.executable, "-m", "pgleader", *args],
        capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})},
    )  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    # structured log lines (JSON) may come first; the error itself is one plain line
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unreachable_database_is_one_clear_line():
    result = run("status", "--dsn", "host=127.0.0.1 port=1 user=x password=hunter2 dbname=x")
    assert_one_line_error(result, "cannot connect to PostgreSQL at 127.0.0.1:1/x")
    assert "hunter2" not in result.stderr


def test_missing_dsn_is_one_clear_line():
    assert_one_line_error(run("migrate"), "no database given", "PGLEADER_DSN")


def test_impossible_timings_are_refused_at_start(dsn):
    result = run("elect", "--dsn", dsn, "--heartbeat", "2", "--lease", "1")
    assert_one_line_error(result, "lease (1.0 s) must be at least twice the heartbeat")


@pytest.mark.parametrize(
    ("timings", "message"),
    [
        (Timings(heartbeat=0), "heartbeat must be between"),
        (Timings(heartbeat=1, lease=1.5), "at least twice the heartbeat"),
        (Timings(heartbeat=1, lease=3, evict_after=4), r"lease \+ 2 x heartbeat"),
    ],
)
def test_timing_rules(timings, message):
    with pytest.raises(ConfigError, match=message):
        timings.validate()


def test_default_timings_are_valid():
    assert Timings().validate() == Timings(1.0, 3.0, 6.0)


def test_migrate_then_status_print_json(dsn):
    assert json.loads(run("migrate", "--dsn", dsn).stdout) == {"applied": []}
    assert run("status", "--dsn", dsn).stdout == ""  # no election yet
    result = run("status", env={"DATABASE_URL": dsn})
    assert result.returncode == 0, result.stderr


def test_status_before_migrate_says_what_to_do(empty_database_dsn):
    assert_one_line_error(run("status", "--dsn", empty_database_dsn), "run `pgleader migrate`")


def test_watch_prints_transitions_as_json_lines(dsn):
    with subprocess.Popen(
        [sys.executable, "-m", "pgleader", "watch", "--dsn", dsn],
        stdout=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        try:
            assert json.loads(proc.stdout.readline())["event"] == "watching"
            elect = subprocess.Popen(
                [sys.executable, "-m", "pgleader", "elect", "--dsn", dsn, "--instance-id", "w1"],
                stdout=subprocess.DEVNULL,
            )
            try:
                event = json.loads(proc.stdout.readline())
            finally:
                elect.terminate()
                elect.wait(10)
            assert event["event"] == "elected" and event["leader"] == "w1" and event["epoch"] == 1
            assert set(event) == {"event", "election", "epoch", "leader", "previous", "at"}
            assert json.loads(proc.stdout.readline())["event"] == "resigned"
        finally:
            proc.terminate()
            proc.wait(10)


def test_serve_with_an_unknown_database_fails_at_once_in_one_line(dsn):
    bad = dsn.replace("dbname=pgleader_test", "dbname=no_such_db")
    result = run("serve", "--dsn", bad, "--port", "1", env={"PGLEADER_WEBHOOK_SECRET": "x"})
    assert_one_line_error(result, 'database "no_such_db" does not exist')


def test_serve_gives_up_on_an_unreachable_database_after_its_startup_timeout():
    result = run(
        "serve", "--dsn", "host=127.0.0.1 port=1 dbname=x", "--startup-timeout", "1",
        env={"PGLEADER_WEBHOOK_SECRET": "x"},
    )  # fmt: skip
    assert_one_line_error(
        result, "cannot connect to PostgreSQL at 127.0.0.1:1/x", "gave up after 1 s"
    )


def test_serve_without_a_webhook_secret_refuses_to_start(dsn):
    assert_one_line_error(run("serve", "--dsn", dsn), "no webhook secret")


def test_serve_refuses_a_batch_interval_outside_zero_to_one_second(dsn):
    env = {"PGLEADER_WEBHOOK_SECRET": "x", "PGLEADER_BATCH_INTERVAL": "5"}
    assert_one_line_error(
        run("serve", "--dsn", dsn, env=env), "PGLEADER_BATCH_INTERVAL", "0 to 1 s"
    )
