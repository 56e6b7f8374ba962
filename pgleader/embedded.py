"""A private PostgreSQL server from the local binaries, for one command on a fresh machine.

Used by `pgleader serve`/`demo` when no DSN is given, and by the test suite,
which must own a server it may restart or kill. PostgreSQL refuses to run as
root; when we are root the server runs as the `postgres` system user (through
runuser) in a data directory owned by that user. Trust authentication, bound
to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pgleader.errors import ConfigError

__all__ = ["EmbeddedPostgres", "find_bindir", "free_port"]


def find_bindir() -> Path:
    """The newest local PostgreSQL bin directory; PGLEADER_PG_BINDIR overrides."""
    override = os.environ.get("PGLEADER_PG_BINDIR")
    candidates = [Path(override)] if override else []
    if not override:
        candidates += sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
        pg_ctl = shutil.which("pg_ctl")
        if pg_ctl:
            candidates.append(Path(pg_ctl).parent)
    for bindir in candidates:
        if (bindir / "pg_ctl").exists() and (bindir / "initdb").exists():
            return bindir
    raise ConfigError(
        "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin and PATH); "
        "install postgresql or set PGLEADER_DSN to an existing server"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedPostgres:
    """initdb once into `data_dir`, then start/stop/restart/kill a server on 127.0.0.1:`port`."""

    def __init__(self, data_dir: Path, port: int | None = None, user: str = "postgres") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.user = user
        self.bindir = find_bindir()
        self._as_postgres = os.geteuid() == 0

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres"

    def dsn_for(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, cwd="/")

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.data_dir, "postgres", "postgres")
            # the server user must be able to reach its data directory
            for parent in self.data_dir.parents:
                if parent == Path("/"):
                    break
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    raise ConfigError(
                        f"{parent} is not traversable by the postgres user; "
                        "choose a data directory under /tmp or /var/lib, or set PGLEADER_DSN"
                    )
        result = self._run(
            "initdb", "-D", str(self.data_dir), "-U", self.user, "-A", "trust",
            "-E", "UTF8", "--no-sync", check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise ConfigError(f"initdb failed: {result.stderr.strip().splitlines()[-1:]}")

    def start(self, timeout: float = 30.0) -> str:
        self.init()
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data_dir}"
            " -c max_connections=300 -c shared_buffers=64MB -c track_commit_timestamp=on"
        )
        result = self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.data_dir / "server.log"),
            "-o", opts, "-w", "-t", str(int(timeout)), "start", check=False,
        )  # fmt: skip
        if result.returncode != 0:
            tail = self.log_tail()
            raise ConfigError(f"embedded PostgreSQL did not start: {tail or result.stderr.strip()}")
        return self.dsn

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        result = self._run("pg_ctl", "-D", str(self.data_dir), "status", check=False)
        return result.returncode == 0

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                self._run(
                    "pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False
                ).returncode
                == 0
            ):
                return
            time.sleep(0.1)
        raise ConfigError(f"PostgreSQL on port {self.port} not ready after {timeout} s")

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.data_dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])
