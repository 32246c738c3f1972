"""Database faults a test injects from outside the daemon: another process holding
SQLite's write lock, a small file system of the test's own that it fills.

Both are real: the lock is `BEGIN EXCLUSIVE` in a separate Python process (what a
backup script or an operator's `sqlite3` shell does), the disk a tmpfs mounted for
the test, on which the daemon's database lives and which the test fills until
writes fail with ENOSPC.
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
import sys
from pathlib import Path

import pytest

LOCK_SCRIPT = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""
"""Takes the write lock (waiting up to 60 s for a commit under way), says so, holds it
until a line comes on stdin."""


class SqliteLock:
    """SQLite's write lock held by another process until `release()`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.proc: subprocess.Popen[str] | None = None

    def acquire(self) -> SqliteLock:
        """Returns once the other process holds the lock."""
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LOCK_SCRIPT, self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        said = self.proc.stdout.readline()
        assert said == "locked\n", f"the locker said {said!r}, exit {self.proc.poll()}"
        return self

    def release(self) -> None:
        """Roll back and end the other process; it must exit cleanly."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(30) == 0

    def close(self) -> None:
        """For a test's cleanup: the process is ended whatever state it is in."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


class SmallDisk:
    """A tmpfs of `size` mounted on `path` for one test: `fill()` it until a write
    fails with ENOSPC, `free()` the space again, `close()` to unmount.

    Mounting needs root (CAP_SYS_ADMIN); where it is refused (a container without
    it, a user), the test is skipped and says why.
    """

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        self.size = size
        self.filler = path / "filler"
        self.mounted = False

    def mount(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs for a full disk: {done.stderr.strip()}")
        self.mounted = True
        return self

    def fill(self) -> int:
        """Write a file until the disk is full; how many bytes it took."""
        written = 0
        block = b"\0" * 4096
        with open(self.filler, "ab", buffering=0) as file:
            while True:
                try:
                    written += file.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    return written

    def free(self) -> None:
        self.filler.unlink()

    def close(self) -> None:
        """Unmount; lazily if a process still has a file open (a daemon the test's
        cleanup has not stopped yet): the kernel unmounts once it is closed."""
        if not self.mounted:
            return
        self.mounted = False
        done = subprocess.run(["umount", str(self.path)], capture_output=True, check=False)
        if done.returncode != 0:
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=True)
