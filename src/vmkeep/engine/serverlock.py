"""One server per data directory: two servers on the same state would fire every schedule
twice. The lock is an flock on `server.pid` in the data directory, so it dies with its
process (SIGKILL included) and never needs cleaning up. The CLI asks `server_pid` whether a
server is up (then it hands jobs over; else it runs them in-process)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from vmkeep.errors import ServerError

PID_FILE = "server.pid"
PROBE_WAIT_S = 0.5  # how long a refused lock is tried again (server_pid's probes take µs)


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


class ServerLock:
    """Held for the server's lifetime; `acquire` raises ServerError naming the other pid."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / PID_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        if not _exclusive(fd):
            os.close(fd)
            other = read_pid(self.path)
            who = f"pid {other}" if other else "another process"
            raise ServerError(
                f"a vmkeep server ({who}) already runs on data directory {self.path.parent}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def _exclusive(fd: int) -> bool:
    """The exclusive lock, or False when a server holds it. `server_pid` takes a shared lock
    for an instant to ask: a server starting at that instant would be refused as if another
    ran (a test polling for its start hung on it), so a refusal is tried again for a while;
    a server holds the lock for its lifetime and stays refused."""
    deadline = time.monotonic() + PROBE_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def server_pid(directory: Path) -> int | None:
    """The pid of the server running on this data directory, or None when none runs."""
    path = directory / PID_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_pid(path) or -1
    finally:
        os.close(fd)
    return None
