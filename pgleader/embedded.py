"""A private PostgreSQL server from the local binaries, for one command on a fresh machine.

Used by `pgleader serve`/`demo` when no DSN is given, and by the test suite,
which must own a server it may restart or kill. PostgreSQL refuses to run as
root; when we are root the server runs as the `postgres` system user (through
runuser) in a data directory owned by that user. Trust authentication, bound
to 127.0.0.1 only.

`serve` keeps its cluster in DATA_DIR/pg, except as root when the postgres user
cannot reach that (a checkout in /root, mode 700): then in
/var/lib/pgleader/embedded/<hash of DATA_DIR> (see `cluster_dir`).
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pgleader.errors import ConfigError

__all__ = ["RELOCATED_CLUSTERS", "EmbeddedPostgres", "cluster_dir", "find_bindir", "free_port"]

# As root, where a data directory's cluster goes when the postgres user cannot reach it.
RELOCATED_CLUSTERS = Path("/var/lib/pgleader/embedded")


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


def cluster_dir(data_dir: Path, user: str = "postgres") -> Path:
    """Where the embedded cluster of `data_dir` lives: `data_dir`/pg, unless we are root
    and `user` (who runs the server) cannot traverse the directories down to it; then
    RELOCATED_CLUSTERS/<hash of data_dir>, which root creates for it. A cluster already
    in either place is used, so a data directory keeps its cluster between runs."""
    data_dir = Path(data_dir).resolve()
    home = data_dir / "pg"
    if os.geteuid() != 0:
        return home
    elsewhere = RELOCATED_CLUSTERS / hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    for candidate in (home, elsewhere):
        if (candidate / "PG_VERSION").exists():
            return candidate
    return home if traversable_by(user, home) else elsewhere


def traversable_by(user: str, path: Path) -> bool:
    """Whether `user` may pass through every existing directory above `path`, by the
    owner, group and other bits (root's view of another user's rights). An unknown
    user: True, and the server's start will say what is wrong."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return True
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    for parent in Path(path).parents:
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == account.pw_uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid in groups:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            return False
    return True


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nobody listens on now, and never one this process handed out before: the
    kernel may offer a port again as soon as the probe closes, and two servers given
    the same one would fail to start."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError("no free TCP port on 127.0.0.1 that this process has not handed out")


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
        if self._as_postgres and self.data_dir.is_relative_to(RELOCATED_CLUSTERS):
            for directory in (RELOCATED_CLUSTERS.parent, RELOCATED_CLUSTERS):
                if not directory.exists():  # root's, open to pass through (not to list)
                    directory.mkdir(parents=True, exist_ok=True)
                    directory.chmod(0o711)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.data_dir, "postgres", "postgres")
            self.data_dir.chmod(0o700)
            # the server user must be able to reach its data directory
            if not traversable_by("postgres", self.data_dir):
                raise ConfigError(
                    f"{self.data_dir} is not traversable by the postgres user; "
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
