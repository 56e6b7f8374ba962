"""`pgleader doctor` judges real deployments: a lone server, a primary with a synchronous
standby, one with an asynchronous standby, a standby itself, and a transaction-mode
PgBouncer in between (Debian's pgbouncer, installed by `make debs`). One line per
check; exit 0 when nothing fails, 1 when a check fails, 2 when it cannot connect."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgleader.embedded import free_port
from tests.support.cli import on_terminal, pgleader_here
from tests.support.replication import ReplicatedPostgres, replicated_postgres

CHECKS = [
    "direct connection", "server version", "primary", "synchronous_commit",
    "synchronous_standby_names", "track_commit_timestamp",
]  # fmt: skip


async def doctor(dsn: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    """(exit code, check -> its JSON line, stderr) of `pgleader doctor --dsn DSN`."""
    code, out, err = await pgleader_here("doctor", "--dsn", dsn)
    lines = [json.loads(line) for line in out.splitlines()]
    return code, {line["check"]: line for line in lines}, err


def statuses(found: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {check: line["status"] for check, line in found.items()}


@pytest.fixture(scope="module")
def sync_pair() -> Iterator[ReplicatedPostgres]:
    with replicated_postgres(synchronous=True) as pair:
        yield pair


@pytest.fixture(scope="module")
def async_pair() -> Iterator[ReplicatedPostgres]:
    with replicated_postgres(synchronous=False) as pair:
        yield pair


async def test_a_lone_server_with_a_direct_connection_passes(dsn):
    code, found, err = await doctor(dsn)
    assert code == 0, (found, err)
    assert list(found) == CHECKS
    assert set(statuses(found).values()) == {"ok"}, found
    assert "no standby" in found["synchronous_standby_names"]["detail"]
    assert "supported: 14 and newer" in found["server version"]["detail"]


async def test_a_primary_with_a_synchronous_standby_passes(sync_pair):
    code, found, err = await doctor(sync_pair.dsn)
    assert code == 0, (found, err)
    assert set(statuses(found).values()) == {"ok"}, found
    assert "standby1 (sync)" in found["synchronous_standby_names"]["detail"]


async def test_an_asynchronous_standby_fails_saying_a_failover_can_lose_commits(async_pair):
    code, found, _ = await doctor(async_pair.dsn)
    assert code == 1
    assert statuses(found) == {**dict.fromkeys(CHECKS, "ok"), "synchronous_standby_names": "fail"}
    detail = found["synchronous_standby_names"]["detail"]
    assert "standby1 (async)" in detail and "can lose the last commits" in detail
    assert "synchronous_mode" in detail


async def test_synchronous_commit_off_or_local_on_a_replicated_primary_fails(sync_pair):
    local = make_conninfo(sync_pair.dsn, options="-c synchronous_commit=local")
    code, found, _ = await doctor(local)
    assert code == 1 and found["synchronous_commit"]["status"] == "fail"
    assert "set synchronous_commit = on" in found["synchronous_commit"]["detail"]
    off = make_conninfo(sync_pair.dsn, options="-c synchronous_commit=off")
    code, found, _ = await doctor(off)
    assert code == 1 and found["synchronous_commit"]["status"] == "fail"
    remote_write = make_conninfo(sync_pair.dsn, options="-c synchronous_commit=remote_write")
    code, found, _ = await doctor(remote_write)
    assert code == 0 and found["synchronous_commit"]["status"] == "ok"


async def test_a_standby_is_not_a_primary(sync_pair):
    code, found, _ = await doctor(sync_pair.standby.dsn)
    assert code == 1
    assert found["primary"]["status"] == "fail"
    assert "target_session_attrs=read-write" in found["primary"]["detail"]
    assert found["synchronous_standby_names"]["status"] == "warn"


# --- through PgBouncer ------------------------------------------------------------------


@pytest.fixture
def pgbouncer(dsn: str) -> Iterator[dict[str, str]]:
    """PgBouncer in front of this test's database: pool mode -> a DSN through it (one
    database alias per mode). Run as the postgres user when we are root (it refuses
    root)."""
    target = conninfo_to_dict(dsn)
    tmp = Path(tempfile.mkdtemp(prefix="pgleader-bouncer-"))
    os.chmod(tmp, 0o755)
    port = free_port()
    server = f"host=127.0.0.1 port={target['port']} dbname={target['dbname']} user={target['user']}"
    ini = tmp / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"tx = {server} pool_mode=transaction\n"
        f"session = {server} pool_mode=session\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = any\ndefault_pool_size = 4\nmax_client_conn = 50\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
    )
    ini.chmod(0o644)
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    cmd = [binary, str(ini)]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    with (tmp / "pgbouncer.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, (tmp / "pgbouncer.log").read_text()
            assert time.monotonic() < deadline, "pgbouncer did not listen within 10 s"
            time.sleep(0.05)
        base = f"host=127.0.0.1 port={port} user={target['user']}"
        yield {"transaction": f"{base} dbname=tx", "session": f"{base} dbname=session"}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


async def test_a_transaction_mode_pooler_fails_the_direct_connection_check(pgbouncer):
    code, found, err = await doctor(pgbouncer["transaction"])
    assert code == 1, (found, err)
    check = found["direct connection"]
    assert check["status"] == "fail", check
    assert "pooler in transaction mode" in check["detail"]
    assert "direct connection" in check["detail"]
    others = {name: s for name, s in statuses(found).items() if name != "direct connection"}
    assert set(others.values()) == {"ok"}, found


async def test_a_session_mode_pool_keeps_session_locks_and_passes(pgbouncer):
    code, found, err = await doctor(pgbouncer["session"])
    assert code == 0, (found, err)
    assert found["direct connection"]["status"] == "ok"


# --- errors -------------------------------------------------------------------------------


def test_an_unreachable_database_is_one_line_exit_2_without_the_password():
    env = {k: v for k, v in os.environ.items() if k not in ("PGLEADER_DSN", "DATABASE_URL")}
    result = subprocess.run(
        [sys.executable, "-m", "pgleader", "doctor", "--dsn",
         "host=127.0.0.1 port=1 user=x password=hunter2 dbname=x"],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "pgleader doctor: error: cannot connect to PostgreSQL at 127.0.0.1:1"
    )
    assert result.stdout == ""


async def test_no_database_given_is_a_usage_error():
    code, out, err = await pgleader_here("doctor")
    assert code == 2 and out == ""
    assert err.strip() == (
        "pgleader doctor: error: no database given: use --dsn, PGLEADER_DSN or DATABASE_URL"
    )


def test_on_a_terminal_each_check_is_one_aligned_line(dsn):
    lines = on_terminal("doctor", "--dsn", dsn).splitlines()
    assert [line.split()[0] for line in lines] == ["ok"] * len(CHECKS), lines
    assert {line.index(check) for line, check in zip(lines, CHECKS, strict=True)} == {6}, lines
