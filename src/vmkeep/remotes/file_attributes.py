"""The Linux immutable file attribute (`chattr +i`), read and set through its ioctl.

An immutable file cannot be written, renamed, linked to or deleted, even by root, until
someone with CAP_LINUX_IMMUTABLE clears the attribute. ext4, XFS and btrfs support it;
file systems that do not (NFS, CIFS, FAT) answer ENOTTY or EOPNOTSUPP.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os

FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long) on 64-bit Linux; the kernel reads an int
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
UNSUPPORTED = (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL)


def get_flags(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return buf[0]


def fd_is_immutable(fd: int) -> bool:
    return bool(get_flags(fd) & FS_IMMUTABLE_FL)


def set_immutable(fd: int, on: bool) -> bool:
    """Sets or clears the attribute; returns whether it changed anything."""
    flags = get_flags(fd)
    wanted = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
    if wanted == flags:
        return False
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("i", [wanted]))
    return True


def is_immutable(path: str | os.PathLike[str]) -> bool:
    """False as well when the file is missing or the file system has no such attribute."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return fd_is_immutable(fd)
    except OSError as exc:
        if exc.errno in UNSUPPORTED:
            return False
        raise
    finally:
        os.close(fd)
