"""A replicated PostgreSQL of the suite's own: a primary and one streaming standby.

Built on pgleader.embedded (as root, both servers run as the `postgres` system user,
like the suite's own server). The standby is a `pg_basebackup -R` copy of the primary
that streams its WAL for real, synchronously (the primary's `synchronous_standby_names`
names it, `synchronous_commit = on`: a commit returns once the standby has flushed it)
or asynchronously, as the caller chooses. A failover is `stop_primary()` (mode
immediate: a crash) then `promote()`. The old primary is never started again: beside
the promoted standby it would be a second writable database, which no fencing in the
gateway can make safe (that is the platform's job, as Patroni does it).

Clients reach whichever node is primary through `dsn_for()`, a multi-host DSN with
`target_session_attrs=read-write`: libpq tries the nodes in turn and keeps the first
that accepts writes.

Asynchronous, the pair can lose commits on purpose: `wait_replayed()`, then
`stop_standby()` (the primary goes on alone), `stop_primary()`, `start_standby()` and
`promote()`: the promoted standby lacks everything committed after the first stop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from pgleader.embedded import EmbeddedPostgres

__all__ = [
    "ReplicatedPostgres", "append_settings", "as_server_user", "base_backup",
    "replicated_postgres",
]  # fmt: skip


class ReplicatedPostgres:
    """A primary and a standby under `root`; `start()` makes and starts both."""

    def __init__(self, root: Path, *, synchronous: bool, standby_name: str = "standby1") -> None:
        self.root = Path(root)
        self.synchronous = synchronous
        self.standby_name = standby_name
        self.primary = EmbeddedPostgres(self.root / "primary")
        self.standby = EmbeddedPostgres(self.root / "standby")
        self.primary_stopped = False
        self.promoted = False

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 60.0) -> None:
        self.primary.init()
        sync_names = f"'{self.standby_name}'" if self.synchronous else "''"
        append_settings(
            self.primary.data_dir / "postgresql.conf",
            wal_level="replica",
            max_wal_senders="5",
            synchronous_commit="on",
            synchronous_standby_names=sync_names,
        )
        self.primary.start()
        self._base_backup()
        # The copy carries the primary's settings: once promoted, with no standby of its
        # own, a synchronous_standby_names naming itself would make every commit wait.
        append_settings(self.standby.data_dir / "postgresql.conf", synchronous_standby_names="''")
        self.standby.start()
        self.wait_streaming(timeout)

    def _base_backup(self) -> None:
        base_backup(self.primary, self.standby.data_dir, self.standby_name)

    def wait_streaming(self, timeout: float = 30.0) -> None:
        """Until the primary shows the standby streaming (and, synchronous, as `sync`)."""
        wanted = "sync" if self.synchronous else "async"
        deadline = time.monotonic() + timeout
        seen: tuple[str, str] | None = None
        while time.monotonic() < deadline:
            with psycopg.connect(self.primary.dsn, autocommit=True) as conn:
                row = conn.execute(
                    "select state, sync_state from pg_stat_replication where application_name = %s",
                    [self.standby_name],
                ).fetchone()
            seen = (row[0], row[1]) if row else None
            if seen == ("streaming", wanted):
                return
            time.sleep(0.05)
        raise TimeoutError(
            f"standby {self.standby_name} not streaming ({wanted}) after {timeout} s:"
            f" pg_stat_replication shows {seen}; standby log: {self.standby.log_tail()}"
        )

    def wait_replayed(self, timeout: float = 30.0) -> str:
        """Until the standby has replayed all the primary has written so far; returns
        that position (an LSN)."""
        with psycopg.connect(self.primary.dsn, autocommit=True) as conn:
            row = conn.execute("select pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        wanted = str(row[0])
        deadline = time.monotonic() + timeout
        replayed = None
        while time.monotonic() < deadline:
            with psycopg.connect(self.standby.dsn, autocommit=True) as conn:
                row = conn.execute(
                    "select pg_last_wal_replay_lsn()::text, pg_last_wal_replay_lsn() >= %s::pg_lsn",
                    [wanted],
                ).fetchone()
            assert row is not None
            replayed = row[0]
            if row[1]:
                return wanted
            time.sleep(0.02)
        raise TimeoutError(f"the standby replayed up to {replayed}, not {wanted}, in {timeout} s")

    def stop_standby(self) -> None:
        """The standby goes away cleanly (mode fast): what the primary commits from now
        on, it never receives (asynchronous: the primary does not wait for it)."""
        if self.synchronous:
            raise RuntimeError("a synchronous primary would wait for its standby for ever")
        self.standby.stop("fast")

    def start_standby(self) -> None:
        """The standby back, still a standby: it streams again from the primary if that
        is up, else it waits in recovery (readable) for `promote()`."""
        self.standby.start()

    def stop_primary(self) -> None:
        """The primary crashes (pg_ctl stop -m immediate); it never comes back."""
        self.primary.stop("immediate")
        self.primary_stopped = True

    def promote(self, timeout: float = 30.0) -> None:
        """`pg_ctl promote` the standby and wait until it accepts writes."""
        if not self.primary_stopped:
            raise RuntimeError("stop the primary first: two writable nodes must never coexist")
        result = as_server_user(
            self.standby, "pg_ctl", "-D", str(self.standby.data_dir), "-w",
            "-t", str(int(timeout)), "promote",
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl promote failed: {result.stderr.strip()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with psycopg.connect(self.standby.dsn, autocommit=True) as conn:
                row = conn.execute("select pg_is_in_recovery()").fetchone()
            if row is not None and not row[0]:
                self.promoted = True
                return
            time.sleep(0.02)
        raise TimeoutError(f"the standby still in recovery {timeout} s after pg_ctl promote")

    def close(self) -> None:
        """Stop both servers at once (immediate), killing what will not stop."""
        for node in (self.standby, self.primary):
            pid = node.postmaster_pid()
            node.stop("immediate")
            if pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ addresses

    def dsn_for(self, dbname: str = "postgres", **params: str) -> str:
        """The multi-host DSN: both nodes, the first that accepts writes wins."""
        extra = "".join(f" {key}={value}" for key, value in params.items())
        return (
            f"host=127.0.0.1,127.0.0.1 port={self.primary.port},{self.standby.port}"
            f" user={self.primary.user} dbname={dbname} target_session_attrs=read-write"
            f" connect_timeout=2{extra}"
        )

    @property
    def dsn(self) -> str:
        return self.dsn_for()


def base_backup(primary: EmbeddedPostgres, target: Path, application_name: str) -> None:
    """`pg_basebackup -R` of `primary` into `target`: a standby that will stream from it
    under `application_name` (the name synchronous_standby_names may give)."""
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # the server user writes the copy, and owns it
        shutil.chown(target, "postgres", "postgres")
    target.chmod(0o700)
    source = (
        f"host=127.0.0.1 port={primary.port} user={primary.user}"
        f" application_name={application_name}"
    )
    result = as_server_user(
        primary,
        "pg_basebackup", "-D", str(target), "-d", source, "-R", "-X", "stream",
        "-c", "fast", "--no-sync",
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"pg_basebackup failed: {result.stderr.strip()}")


def append_settings(path: Path, **settings: str) -> None:
    """Settings at the end of a postgresql.conf (a later line wins)."""
    with path.open("a") as conf:
        conf.write("\n# tests.support.replication\n")
        conf.writelines(f"{name} = {value}\n" for name, value in settings.items())


def as_server_user(server: EmbeddedPostgres, *args: str) -> subprocess.CompletedProcess[str]:
    """A PostgreSQL program run as the server's user (root may not run the server)."""
    cmd = [str(server.bindir / args[0]), *args[1:]]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd="/", timeout=120)


@contextlib.contextmanager
def replicated_postgres(*, synchronous: bool) -> Iterator[ReplicatedPostgres]:
    """A started primary + standby in a temporary directory; killed and removed after."""
    tmp = tempfile.mkdtemp(prefix="pgleader-repl-")
    os.chmod(tmp, 0o755)  # the postgres user must pass through
    pair = ReplicatedPostgres(Path(tmp), synchronous=synchronous)
    try:
        pair.start()
        yield pair
    finally:
        pair.close()
        shutil.rmtree(tmp, ignore_errors=True)
