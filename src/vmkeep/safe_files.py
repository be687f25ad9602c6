"""Small files vmkeep writes into directories others may write too (vm.json, the remote
registry, a restore's owner record): created exclusively without following a planted symlink
(O_EXCL|O_NOFOLLOW, unpredictable temporary names) and fsynced, then renamed into place, so
whoever can write the directory can neither redirect the write nor leave half a file."""

from __future__ import annotations

import os
from pathlib import Path

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create `path`, which must not exist (not even as a symlink), with `data`, durably."""
    fd = os.open(path, _CREATE, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` atomically with `data`: a new temporary beside it, then a rename and an
    fsync of the directory. The temporary is removed if anything fails."""
    tmp = path.with_name(f".{path.name}.tmp-{os.urandom(6).hex()}")
    try:
        write_new(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path | str) -> None:
    """Make a rename or file creation in `path` durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
