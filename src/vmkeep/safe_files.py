"""Small files vmkeep writes into directories others may write too (vm.json, the remote
registry, a restore's owner record): created exclusively without following a planted symlink
(O_EXCL|O_NOFOLLOW, unpredictable temporary names) and fsynced, then renamed into place, so
whoever can write the directory can neither redirect the write nor leave half a file."""

from __future__ import annotations

import os
from pathlib import Path

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_new(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Create `path`, which must not exist (not even as a symlink), with `data`, durably
    unless `durable` is false."""
    fd = os.open(path, _CREATE, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Replace `path` atomically with `data`: a new temporary beside it, then a rename and an
    fsync of the directory. The temporary is removed if anything fails. `durable=False`: no
    fsync, for a file whose reader detects and drops a torn or lost copy (a sealed cache):
    after a crash it may be empty or truncated, but never another file's data."""
    tmp = path.with_name(f".{path.name}.tmp-{os.urandom(6).hex()}")
    try:
        write_new(tmp, data, mode, durable)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path | str) -> None:
    """Make a rename or file creation in `path` durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
