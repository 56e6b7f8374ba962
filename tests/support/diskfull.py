"""A small file system a test can fill, for the disk-full cases of the spool.

As root (the CI case): a tmpfs of `size` bytes mounted on a directory of its
own; `fill(leave)` writes a filler file until ENOSPC, then shrinks it so that
about `leave` bytes stay free (tmpfs counts whole pages); `free()` deletes it.

Not root, root without the right to mount (a container), or
PGLEADER_TEST_DISK=rlimit: the directory is on the ordinary disk and
a full disk is emulated with a file-size limit (RLIMIT_FSIZE) on the processes
`watch`ed (pid 0: this one): `fill(leave)` lets no file of theirs grow more than
`leave` bytes past the largest file in the directory, so a write there stops
short and then fails with EFBIG; `free()` restores their limits. A process
writing under the limit must ignore SIGXFSZ (service.intake.spool does), or the kernel
kills it instead. Either way `close()` undoes everything, unmount included.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

__all__ = ["SmallDisk"]

_BLOCK = b"\0" * (64 * 1024)


class SmallDisk:
    def __init__(self, size: int = 4 * 1024 * 1024, mode: str | None = None) -> None:
        chosen = mode or os.environ.get("PGLEADER_TEST_DISK")
        self.mode = chosen or ("tmpfs" if os.geteuid() == 0 else "rlimit")
        if self.mode not in ("tmpfs", "rlimit"):
            raise ValueError(f"PGLEADER_TEST_DISK must be tmpfs or rlimit, not {self.mode!r}")
        self.size = size
        self.path = Path(tempfile.mkdtemp(prefix="pgleader-disk-"))
        os.chmod(self.path, 0o755)
        self._filler = self.path / ".filler"
        self._mounted = False
        self._watched: dict[int, tuple[int, int]] = {}  # pid -> its limits before fill
        self._full = False
        if self.mode == "tmpfs":
            error = self._mount()
            if error is not None:
                if chosen:  # asked for by name: say why it cannot be had
                    shutil.rmtree(self.path, ignore_errors=True)
                    raise RuntimeError(f"cannot mount a tmpfs on {self.path}: {error}")
                self.mode = "rlimit"

    def __enter__(self) -> SmallDisk:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def watch(self, pid: int = 0) -> None:
        """A process whose writes the rlimit emulation limits (tmpfs: nothing to do)."""
        self._watched.setdefault(pid, resource.prlimit(pid, resource.RLIMIT_FSIZE))

    def fill(self, leave: int = 0) -> None:
        """Leave about `leave` bytes of room."""
        self.free()
        self._full = True
        if self.mode == "tmpfs":
            self._fill_tmpfs(leave)
            return
        limit = self._largest_file() + leave
        for pid, (_, hard) in self._watched.items():
            with contextlib.suppress(ProcessLookupError):  # a process since restarted
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))

    def free(self) -> None:
        if not self._full:
            return
        self._full = False
        with contextlib.suppress(FileNotFoundError):
            self._filler.unlink()
        for pid, limits in self._watched.items():
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)

    def close(self) -> None:
        try:
            self.free()
        finally:
            if self._mounted:
                result = subprocess.run(["umount", str(self.path)], capture_output=True)
                if result.returncode != 0:  # still busy: detach it now, freed when unused
                    subprocess.run(["umount", "-l", str(self.path)], check=True)
                self._mounted = False
            shutil.rmtree(self.path, ignore_errors=True)

    def _mount(self) -> str | None:
        """Mount the tmpfs; what went wrong, if it could not be."""
        command = ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs"]
        try:
            result = subprocess.run([*command, str(self.path)], capture_output=True, text=True)
        except OSError as exc:
            return str(exc)
        if result.returncode != 0:
            return result.stderr.strip() or f"mount exited with {result.returncode}"
        self._mounted = True
        return None

    def _fill_tmpfs(self, leave: int) -> None:
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while True:
                try:
                    os.write(fd, _BLOCK)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
        finally:
            os.close(fd)

    def _largest_file(self) -> int:
        largest = 0
        for root, _, files in os.walk(self.path):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    largest = max(largest, os.stat(os.path.join(root, name)).st_size)
        return largest
