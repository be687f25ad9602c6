"""How a local remote writes an object's bytes into its temporary file: buffered (writev of
the pieces), or the aligned head of a format 3 pack with O_DIRECT from the packer's
page-aligned buffer and the rest buffered (docs/DATA-PATH.md, "Direct pack writes")."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Sequence

IOV_MAX = 1024  # Linux's limit of buffers per writev
ALIGN = 4096  # a direct write's address, offset and length: a multiple of any block size


class DirectRefused(Exception):
    """The file system refused O_DIRECT (EINVAL): the caller writes buffered instead."""


def write_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    """Every byte of `parts`, in order: one write for one part, writev for more (at most
    IOV_MAX buffers a call), resumed after a short write."""
    views = [memoryview(p) for p in parts if len(p)]
    i = 0
    while i < len(views):
        batch = views[i : i + IOV_MAX]
        done = os.write(fd, batch[0]) if len(batch) == 1 else os.writev(fd, batch)
        while i < len(views) and done >= len(views[i]):
            done -= len(views[i])
            i += 1
        if done:
            views[i] = views[i][done:]


def write_direct(fd: int, head: memoryview, tail: Sequence[bytes | memoryview]) -> None:
    """`head` then `tail` into `fd`, opened with O_DIRECT at offset 0: the whole pages of
    `head` (page-aligned memory) go past the page cache; O_DIRECT is then cleared on the
    descriptor (fcntl) and what is left, the end of `head` and `tail`, is written buffered.
    DirectRefused when the first direct write is refused (nothing was written)."""
    aligned = len(head) - len(head) % ALIGN
    done = 0
    while done < aligned and done % ALIGN == 0:
        try:
            n = os.write(fd, head[done:aligned])
        except OSError as exc:
            if exc.errno == errno.EINVAL and done == 0:
                raise DirectRefused from None
            raise
        if n <= 0:
            break
        done += n
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
    write_all(fd, [head[done:], *tail])


def drop_cached(fd: int) -> None:
    """Drop an object's pages from the page cache once they are on disk. A backup writes data
    it will not read again soon, and on a hypervisor the cache belongs to the running guests;
    freed pages are also reused by the next write, where fresh ones cost more (measured in a
    VM: 4 MiB write + fsync took 13 ms of CPU with fresh pages, 1.4 ms with dropped ones).
    Advisory: errors are ignored."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def copy_file(src: int, out: int, size: int) -> None:
    """The first `size` bytes of the file `src` into `out`, copied in the kernel
    (sendfile), never through a buffer of ours."""
    done = 0
    while done < size:
        n = os.sendfile(out, src, done, min(size - done, 1 << 30))
        if n <= 0:
            raise OSError(errno.EIO, f"source file ended at {done} of {size} bytes")
        done += n
