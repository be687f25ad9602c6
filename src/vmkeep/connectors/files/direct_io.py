"""Writes that bypass the page cache (O_DIRECT), for a restore writing a raw disk image.

Why: a restore does not read the image back, and on a hypervisor the page cache belongs to the
guests. A buffered write also copies every byte into page cache pages that stay dirty until
written back, so a multi-GiB restore keeps taking fresh pages, which in a VM cost more than the
rest of the pipeline: measured here (1 GiB, `dd bs=4M conv=fsync`) buffered writes took 0.4-3.9
s of system time depending on whether the kernel had to take new pages from the host, O_DIRECT
0.2 s; a 4 GiB restore from S3 went from 10.3-13.0 s to 8.3-10.5 s (docs/DATA-PATH.md). A
direct write copies the data once, in user space, into a page-aligned buffer each thread
reuses, and the device reads it from there.

The local remote's chunk writes stay buffered: each object is fsynced and dropped from the
cache at once, so its pages are recycled cheaply, and direct writes measured no faster there.

Only on file systems known to do direct I/O well (ext2/3/4, XFS, Btrfs). Network file systems
(NFS, CIFS) turn a direct write into synchronous requests, and tmpfs or FUSE may refuse it:
there, and whenever the kernel refuses a direct open or write, writers use buffered I/O."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from vmkeep.direct_io_fs import direct_io_suits

ALIGN = 4096  # offsets, lengths and buffer addresses: a multiple of any logical block size

_local = threading.local()


def open_direct(path: str, flags: int, same_as: int | None = None) -> int | None:
    """An existing `path` opened with O_DIRECT added, or None where the kernel refuses it.
    `same_as`: a descriptor the new one must share its file with. The name is opened a second
    time, so whoever can write the directory could have swapped it for a link meanwhile: a
    symlink is not followed and another file is not used (buffered writes go on instead)."""
    try:
        fd = os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ELOOP):  # no direct I/O here, or a planted link
            return None
        raise
    if same_as is not None:
        mine, theirs = os.fstat(fd), os.fstat(same_as)
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            os.close(fd)
            return None
    os.set_blocking(fd, True)
    return fd


Buffer = bytes | bytearray | memoryview


def aligned_copy(data: Buffer | Sequence[Buffer]) -> memoryview:
    """`data` (one buffer, or pieces that follow each other) copied into this thread's
    page-aligned buffer, zero-padded to a multiple of ALIGN. Valid until the thread's next
    call. Pieces are copied straight in: joining them first would copy every byte twice."""
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    length = sum(len(part) for part in parts)
    padded = -(-length // ALIGN) * ALIGN
    buf: mmap.mmap | None = getattr(_local, "buffer", None)
    if buf is None or len(buf) < padded:
        if buf is not None:
            buf.close()
        buf = _local.buffer = mmap.mmap(-1, max(padded, ALIGN))
    view = memoryview(buf)[:padded]
    pos = 0
    for part in parts:
        view[pos : pos + len(part)] = part
        pos += len(part)
    view[length:] = bytes(padded - length)
    return view


def pwrite_direct(fd: int, data: Buffer | Sequence[Buffer], offset: int) -> int:
    """Write `data` (one buffer or consecutive pieces) at `offset` (a multiple of ALIGN)
    through an O_DIRECT descriptor, padded with zeros to a multiple of ALIGN; returns the
    number of bytes written (the padded length). The caller truncates the padding where it
    must not stay."""
    view = aligned_copy(data)
    try:
        done = 0
        while done < len(view):
            n = os.pwrite(fd, view[done:], offset + done)
            if n <= 0 or n % ALIGN:
                raise OSError(errno.EIO, "short direct write")
            done += n
        return done
    finally:
        view.release()


def _pwrite_exact(fd: int, view: memoryview, offset: int) -> None:
    try:
        done = 0
        while done < len(view):
            with view[done:] as rest:
                n = os.pwrite(fd, rest, offset + done)
            if n <= 0 or n % ALIGN:
                raise OSError(errno.EIO, "short direct write")
            done += n
    finally:
        view.release()


class DirectQueue:
    """Aligned direct writes kept in flight on `depth` threads, each from its own buffer, so
    the device has more than one write to work on while the caller goes on. Why: with one
    synchronous write at a time a restore's writing thread waited on the disk for 3.2 of its
    3.4-3.7 s (2 GiB into a qcow2 image beside the repository's reads); two in flight cut the
    restore by a fifth. A write waits for any write in flight over the same bytes (so writes
    land in the order given) and for its buffer; `drain` waits for all and raises the first
    error, which is how errors reach the caller (at the latest on close). Not thread-safe:
    one caller at a time, as DiskWriter."""

    def __init__(self, fd: int, depth: int = 2, buffers: int = 4, size: int = 4 << 20) -> None:
        self.fd = fd
        self.size = size
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="vmkeep-direct")
        self._buffers = [mmap.mmap(-1, size) for _ in range(buffers)]
        self._busy: list[tuple[int, int, Future[None]] | None] = [None] * buffers
        self._next = 0

    def submit(self, parts: Sequence[Buffer], offset: int, length: int) -> None:
        """Queue `parts` (`length` bytes, a multiple of ALIGN and at most `size`) at `offset`."""
        for slot in self._busy:
            if slot is not None and slot[0] < offset + length and offset < slot[1]:
                slot[2].result()
        k = self._next
        self._next = (k + 1) % len(self._buffers)
        slot = self._busy[k]
        if slot is not None:
            self._busy[k] = None
            slot[2].result()
        view = memoryview(self._buffers[k])[:length]
        pos = 0
        for part in parts:
            view[pos : pos + len(part)] = part
            pos += len(part)
        job = self._pool.submit(_pwrite_exact, self.fd, view, offset)
        self._busy[k] = (offset, offset + length, job)

    def drain(self) -> None:
        """Wait for every write in flight; the first error is raised after all are done."""
        error: BaseException | None = None
        for k, slot in enumerate(self._busy):
            if slot is None:
                continue
            self._busy[k] = None
            try:
                slot[2].result()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    def close(self) -> None:
        """Drain (raising the first error), then free the threads and buffers."""
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)
            for buf in self._buffers:
                with contextlib.suppress(BufferError):  # a view still held: freed by the GC
                    buf.close()


class DirectWrites:
    """A disk writer's O_DIRECT side (raw and qcow2 writers): a second descriptor on its file
    where the file system suits; the first write synchronous, so that a refusal (EINVAL: a
    constraint beyond ALIGN) sends every later write through the page cache at once; then up
    to a DirectQueue of writes in flight. The owner drains before any buffered write or hole
    punch over the same file, so a write never races one in flight."""

    def __init__(self, path: str, same_as: int) -> None:
        self.fd: int | None = None
        self._queue: DirectQueue | None = None
        if direct_io_suits(path):
            with contextlib.suppress(OSError):
                self.fd = open_direct(path, os.O_WRONLY, same_as=same_as)

    def write(self, parts: Sequence[Buffer], offset: int, length: int) -> bool:
        """False when this write must go through the page cache (unaligned, or no O_DIRECT)."""
        fd = self.fd
        if fd is None or offset % ALIGN or length % ALIGN:
            return False
        if self._queue is not None and length <= self._queue.size:
            self._queue.submit(parts, offset, length)  # a later error surfaces on drain
            return True
        self.drain()
        try:
            pwrite_direct(fd, parts, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd = None
            os.close(fd)
            return False
        if self._queue is None:
            self._queue = DirectQueue(fd)
        return True

    def drain(self) -> None:
        if self._queue is not None:
            self._queue.drain()

    def close(self) -> None:
        """The queue stopped (drain first: its error is raised there) and the descriptor
        closed, whatever happened."""
        if self._queue is not None:
            with contextlib.suppress(OSError):
                self._queue.close()
            self._queue = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
