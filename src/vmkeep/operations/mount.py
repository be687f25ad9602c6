"""`vmkeep mount`: a restore point's disk as one read-only raw image file through FUSE.

mfusepy rather than pyfuse3: it binds libfuse 3 through ctypes (nothing to compile, no
trio), and its synchronous, multithreaded callbacks fit PointDisk, whose `pread` is
thread-safe and already fetches ahead for sequential readers. The file system holds one
directory with one file, `<disk>.raw`; any tool that reads files (`cat`, `losetup -r`,
`mount -o ro` through a loop device, `fsck -n`, forensic tools) can read the disk. The mount
is read-only twice over: the kernel refuses writes on an `ro` mount (EROFS), and the file
system implements no operation that writes."""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import mfusepy

from vmkeep.errors import UsageError, VmkeepError

from .point_disk import PointDisk

FSNAME = "vmkeep"  # the mount's source in /proc/self/mountinfo; its type is fuse.vmkeep
BLOCK = 4096
MAX_THREADS = 8  # FUSE worker threads: reads wait on chunk fetches, PointDisk bounds memory


def image_name(disk_name: str) -> str:
    """The image file's name: the disk's name with `.raw`, made safe as one path component."""
    safe = "".join(c if c.isprintable() and c not in "/\0" else "_" for c in disk_name)
    return f"{safe.lstrip('.') or 'disk'}.raw"


class ImageFs:
    """FUSE operations for a root directory holding the one image file."""

    use_ns = True  # times in nanoseconds (mfusepy's modern interface)

    def __init__(self, disk: PointDisk, name: str, created_ns: int) -> None:
        self.disk = disk
        self.path = "/" + name
        self.name = name
        self.times = {"st_atime": created_ns, "st_mtime": created_ns, "st_ctime": created_ns}
        self.owner = {"st_uid": os.getuid(), "st_gid": os.getgid()}
        self.allocated = disk.index.nonzero_bytes()
        self.mounted = False

    def init(self, path: str) -> None:
        """Called once the kernel mount is up."""
        self.mounted = True

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        if path == "/":
            return dict(
                st_mode=stat.S_IFDIR | 0o555, st_nlink=2, st_size=0, **self.times, **self.owner
            )
        if path == self.path:
            return dict(
                st_mode=stat.S_IFREG | 0o444,
                st_nlink=1,
                st_size=self.disk.size,
                st_blocks=-(-self.allocated // 512),
                st_blksize=BLOCK,
                **self.times,
                **self.owner,
            )
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != "/":
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", self.name]

    def open(self, path: str, flags: int) -> int:
        if path != self.path:
            raise mfusepy.FuseOSError(errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        try:
            return self.disk.pread(offset, size)
        except VmkeepError as exc:
            print(f"warning: read of {size} bytes at {offset}: {exc.message}", file=sys.stderr)
            raise mfusepy.FuseOSError(errno.EIO) from None

    def statfs(self, path: str) -> dict[str, int]:
        blocks = -(-self.disk.size // BLOCK)
        return dict(f_bsize=BLOCK, f_frsize=BLOCK, f_blocks=blocks, f_bfree=0, f_bavail=0,
                    f_files=2, f_ffree=0, f_namemax=255)  # fmt: skip


def check_mountpoint(mountpoint: Path) -> None:
    """A directory that nothing is mounted on yet: one clear error otherwise."""
    if not mountpoint.is_dir():
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is already a mount point")


def serve_mount(disk: PointDisk, disk_name: str, mountpoint: Path) -> None:
    """Mount and serve until unmounted (`vmkeep umount`, `fusermount3 -u`) or SIGINT/SIGTERM;
    libfuse unmounts on those signals."""
    check_mountpoint(mountpoint)
    ops = ImageFs(disk, image_name(disk_name), time.time_ns())
    try:
        mfusepy.FUSE(
            ops,
            str(mountpoint),
            foreground=True,
            ro=True,
            fsname=FSNAME,
            subtype=FSNAME,
            default_permissions=True,
            kernel_cache=True,  # the image never changes: the page cache may keep it
            max_threads=MAX_THREADS,
            max_idle_threads=MAX_THREADS,  # libfuse 3.14 warns about its own default otherwise
        )
    except RuntimeError as exc:
        # libfuse ends its loop with an error code when SIGINT/SIGTERM/SIGHUP stopped it:
        # after a successful mount that is the normal way out (it has unmounted).
        if not ops.mounted:
            raise VmkeepError(f"cannot mount {mountpoint}: FUSE failed ({exc})") from None


def vmkeep_mounts() -> dict[str, str]:
    """Mount point → source of every vmkeep FUSE mount (from /proc/self/mountinfo)."""
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) >= 5 and tail and tail[0] == f"fuse.{FSNAME}":
                found[_unescape(fields[4])] = tail[1] if len(tail) > 1 else ""
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field
