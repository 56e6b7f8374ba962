"""The campaign's PostgreSQL: a primary and a synchronous streaming standby that fail over.

Two slots, each a fixed port on 127.0.0.1; a node (pgleader.embedded.EmbeddedPostgres,
data directory of its own) holds a slot until it dies. The instances reach the
database through a multi-host DSN over both slots (`dsn_via`, each slot behind a proxy
of theirs, target_session_attrs=read-write), so they find the primary wherever it is;
the campaign's own sessions use `dsn`, both slots directly.

A failover is `crash_primary()` (pg_ctl stop -m immediate), then `promote()` of the
standby. The old primary's data is thrown away and never started again: beside the
promoted node it would be a second writable database, which no fencing in the gateway
can make safe. `rebuild()` then makes a new standby in the dead slot, a pg_basebackup
of the new primary on the same port; once it streams, the primary names it
synchronous (`synchronous_standby_names`; `synchronous_commit = on`: a commit returns
once the standby flushed it), so a later failover can happen again. Until then the
promoted node commits alone.

`start`, `stop`, `restart`, `is_running` are the primary's, whichever node it is: the
campaign's other database faults (restart_fast, restart_immediate, db_down,
disk_full) keep working after a failover. A rebuild running beside them may see the
primary go away: it starts over (`rebuild` retries until its deadline).

As in tests/support/replication.py, as root the servers and their programs run as the
`postgres` system user.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg

from pgleader.embedded import EmbeddedPostgres, free_port
from tests.support.replication import append_settings, as_server_user, base_backup

__all__ = ["FailoverPair"]

# Every standby's application_name, and so the primary's synchronous_standby_names.
STANDBY = "standby"
SETTINGS = {
    # WAL kept for a standby that was away while the primary restarted
    "wal_keep_size": "'256MB'",
    # how soon a standby streams again once its primary is back (default 5 s: every
    # commit waits for it meanwhile)
    "wal_retrieve_retry_interval": "'100ms'",
    "synchronous_commit": "on",
    # a node commits alone until `rebuild` names its standby (a promoted copy too)
    "synchronous_standby_names": "''",
}


class FailoverPair:
    """A primary and, but while it is rebuilt after a failover, a synchronous standby."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        first = free_port()
        second = free_port()
        while second == first:
            second = free_port()
        self.ports = (first, second)
        self._made = itertools.count(1)
        self.primary = self._node(first)
        self.standby: EmbeddedPostgres | None = None
        self._closing = threading.Event()

    def _node(self, port: int) -> EmbeddedPostgres:
        return EmbeddedPostgres(self.root / f"node{next(self._made)}", port=port)

    # ------------------------------------------------------------------ addresses

    @property
    def dsn(self) -> str:
        """Both slots directly: the first that accepts writes wins."""
        return self.dsn_via(self.ports)

    @staticmethod
    def dsn_via(ports: Sequence[int]) -> str:
        """The multi-host DSN over `ports` (a slot each, or the proxies in front of them)."""
        return (
            f"host={','.join('127.0.0.1' for _ in ports)} port={','.join(map(str, ports))}"
            " user=postgres dbname=postgres target_session_attrs=read-write connect_timeout=2"
        )

    # ------------------------------------------------------------------ life cycle

    def create(self, timeout: float = 120.0) -> None:
        """The primary, then its synchronous standby, streaming."""
        self.primary.init()
        append_settings(self.primary.data_dir / "postgresql.conf", **SETTINGS)
        self.primary.start()
        self.rebuild(timeout)

    def start(self) -> None:
        self.primary.start()

    def stop(self, mode: str = "fast") -> None:
        self.primary.stop(mode)

    def restart(self, mode: str = "fast") -> None:
        self.primary.restart(mode)

    def is_running(self) -> bool:
        return self.primary.is_running()

    def close(self) -> None:
        """Stop every node at once (immediate), killing what will not stop."""
        self._closing.set()
        for node in (self.standby, self.primary):
            if node is not None:
                _crash(node)

    # ------------------------------------------------------------------ failover

    def crash_primary(self) -> None:
        """The primary dies (immediate): no shutdown checkpoint, no goodbye to clients."""
        if self.standby is None:
            raise RuntimeError("no standby to fail over to: rebuild() first")
        _crash(self.primary)

    def promote(self, timeout: float = 30.0) -> None:
        """`pg_ctl promote` the standby, wait until it accepts writes, make it the
        primary; the crashed node's data goes."""
        standby = self.standby
        if standby is None or self.primary.is_running():
            raise RuntimeError("crash_primary() first: two writable nodes must never coexist")
        result = as_server_user(
            standby, "pg_ctl", "-D", str(standby.data_dir), "-w", "-t", str(int(timeout)), "promote"
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl promote failed: {result.stderr.strip()}")
        deadline = time.monotonic() + timeout
        while _in_recovery(standby):  # pg_ctl's -w waits for it: seldom more than once
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby still in recovery {timeout} s after promote")
            time.sleep(0.02)
        old, self.primary, self.standby = self.primary, standby, None
        shutil.rmtree(old.data_dir, ignore_errors=True)

    def rebuild(self, timeout: float = 120.0) -> float:
        """A new standby in the slot the primary does not hold, streaming and named
        synchronous; how long it took. A failed try (the primary restarted or stopped
        by another fault meanwhile) is thrown away and made again, until `timeout`."""
        started = time.monotonic()
        deadline = started + timeout
        port = next(p for p in self.ports if p != self.primary.port)
        while True:
            node = self._node(port)
            try:
                self.primary.wait_ready(max(1.0, deadline - time.monotonic()))
                self._base_backup(node)
                # its copy of the primary's settings names a standby: once promoted,
                # with none of its own, every commit would wait
                append_settings(node.data_dir / "postgresql.conf", **SETTINGS)
                node.start()
                self.standby = node
                self.wait_sync(max(1.0, deadline - time.monotonic()))
                return time.monotonic() - started
            except Exception:
                self.standby = None
                _crash(node)
                shutil.rmtree(node.data_dir, ignore_errors=True)
                self._commit_alone()  # were it named already, every commit would wait
                if self._closing.is_set() or time.monotonic() > deadline:
                    raise

    def _commit_alone(self) -> None:
        append_settings(self.primary.data_dir / "postgresql.conf", synchronous_standby_names="''")
        with contextlib.suppress(psycopg.Error):
            with psycopg.connect(self.primary.dsn, autocommit=True, connect_timeout=2) as c:
                c.execute("select pg_reload_conf()")

    def wait_sync(self, timeout: float = 60.0) -> None:
        """Until the primary shows its standby streaming as `sync` (naming it in
        synchronous_standby_names, and reloading, while it shows `async`)."""
        if self.standby is None:
            raise RuntimeError("no standby")
        conf = self.primary.data_dir / "postgresql.conf"
        deadline = time.monotonic() + timeout
        seen: tuple[str, str] | None = None
        named = False
        while not self._closing.is_set():
            with contextlib.suppress(psycopg.Error):
                with psycopg.connect(self.primary.dsn, autocommit=True, connect_timeout=2) as c:
                    row = c.execute(
                        "select state, sync_state from pg_stat_replication"
                        " where application_name = %s",
                        [STANDBY],
                    ).fetchone()
                    seen = (row[0], row[1]) if row else None
                    if seen == ("streaming", "sync"):
                        return
                    if seen == ("streaming", "async"):
                        if not named:
                            append_settings(conf, synchronous_standby_names=f"'{STANDBY}'")
                            named = True
                        c.execute("select pg_reload_conf()")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"standby not streaming sync after {timeout} s: pg_stat_replication"
                    f" shows {seen}; standby log: {self.standby.log_tail()}"
                )
            time.sleep(0.05)
        raise RuntimeError("closing")

    def _base_backup(self, node: EmbeddedPostgres) -> None:
        if node.data_dir.exists():
            raise FileExistsError(node.data_dir)  # a new standby starts from an empty place
        base_backup(self.primary, node.data_dir, STANDBY)


def _in_recovery(node: EmbeddedPostgres) -> bool:
    """Whether `node` is still a standby (or cannot tell yet)."""
    with contextlib.suppress(psycopg.Error):
        with psycopg.connect(node.dsn, autocommit=True, connect_timeout=2) as conn:
            row = conn.execute("select pg_is_in_recovery()").fetchone()
        return row is None or bool(row[0])
    return True


def _crash(node: EmbeddedPostgres) -> None:
    """pg_ctl stop -m immediate, and SIGKILL should the postmaster outlive it."""
    pid = node.postmaster_pid()
    node.stop("immediate")
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
