"""Where O_DIRECT is worth trying: the file systems known to do direct I/O well, for the files
connector's restore writes (connectors/files/direct_io.py) and a format 3 restore's pack
reads from a local remote (repository/read_buffers.py). A module of its own, so that the
repository side does not import the files connector (~0.14 s of start-up)."""

from __future__ import annotations

import ctypes
import os

from vmkeep.libc import LIBC

_DIRECT_FS = {0xEF53, 0x58465342, 0x9123683E}  # ext2/3/4, XFS, Btrfs (statfs f_type)
_STATFS_SIZE = 120  # struct statfs on 64-bit Linux; f_type is its first field (a long)


def fs_type(path: str) -> int | None:
    """statfs(2)'s f_type (the file system's magic number) of the one holding `path`; None
    when it cannot be had."""
    if LIBC is None:
        return None
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if LIBC.statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def direct_io_suits(path: str) -> bool:
    """Whether direct I/O is worth trying on the file system holding `path` (a file or
    directory that exists). Network file systems (NFS, CIFS) turn a direct request into
    synchronous ones, tmpfs or FUSE may refuse it. VMKEEP_DIRECT_IO=0 turns it off
    everywhere."""
    if os.environ.get("VMKEEP_DIRECT_IO", "1") == "0" or not hasattr(os, "O_DIRECT"):
        return False
    return fs_type(path) in _DIRECT_FS
