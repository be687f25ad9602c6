"""An existing local disk image (qcow2 or raw) opened through a private `qemu-nbd` and libnbd.

Why qemu-nbd rather than vmkeep's own qcow2 code: QEMU reads and writes every qcow2 feature
(backing files, compressed clusters, subclusters, bitmaps kept intact) and honours QEMU's image
locks, so an image a running VM holds is refused instead of corrupted.

    with open_image(path, "qcow2", writable=True) as img:
        img.read(0, 4096); img.write(0, data); img.zero(off, n); img.flush()

`NbdImage` is both a DiskReader and a DiskWriter (connectors/base.py). qemu-nbd is started with
systemd socket activation, so no socket file exists and libnbd owns the process: it exits when
the handle is closed. Its stderr goes to a private memfd (reached through /proc/<pid>/fd: a
killed vmkeep leaves no log file behind), read back for the one-line error when the open fails
(e.g. "Failed to get "write" lock"). One NBD connection serves all threads (libnbd handles are
thread-safe; requests are serialised)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from vmkeep.connectors.base import Extent
from vmkeep.connectors.libvirt.bindings import nbd, nbd_handle, one_line
from vmkeep.connectors.libvirt.transport.nbd_reader import (
    BASE_ALLOCATION,
    DIRTY,
    merged_extents,
    status_collector,
)
from vmkeep.errors import ConnectorError

FORMATS = ("qcow2", "raw")
MAX_REQUEST = 32 << 20  # qemu-nbd refuses larger reads/writes
STATUS_STEP = 1 << 30  # block_status length hint per call
# qemu-nbd runs under `setpriv --pdeathsig KILL`: a vmkeep killed before libnbd connected left
# qemu-nbd waiting for a client forever, holding the image's write lock (the domain could not
# start) and vmkeep's stdout (crash tests). The death signal follows the thread that forked, so
# images are opened from the thread that uses them. A parent already gone before the prctl is
# caught by the $PPID check. `exec` keeps the pid libnbd put in LISTEN_PID; $0 is the log
# file, $1 vmkeep's pid, the rest the qemu-nbd command.
_WRAPPER = 'log=$0 parent=$1; shift; [ "$PPID" = "$parent" ] || exit 1; exec "$@" 2>"$log"'
_DIE_WITH_VMKEEP = ["setpriv", "--pdeathsig", "KILL", "--", "sh", "-c", _WRAPPER]


def qemu_nbd_options(fmt: str, writable: bool, bitmap: str | None = None) -> list[str]:
    """qemu-nbd's options for an image (before its path), the same for a local and a remote
    qemu-nbd (ssh_nbd.py). `bitmap`: a persistent dirty bitmap of the image to export."""
    argv = ["-f", fmt, "--cache=writeback", "--aio=threads"]
    argv += [f"--bitmap={bitmap}"] if bitmap else []
    return argv + (["--discard=unmap"] if writable else ["--read-only"])


class NbdImage:
    """One image file served by its own qemu-nbd. Thread-safe; close() is idempotent. With
    `bitmap` (a persistent dirty bitmap of the image), `dirty_extents` are the ranges it marks:
    the caller sets `dirty_since` to the checkpoint that bitmap belongs to."""

    def __init__(
        self, path: str, fmt: str, *, writable: bool, name: str = "", bitmap: str | None = None
    ) -> None:
        if fmt not in FORMATS:
            raise ConnectorError(f"{path}: image format {fmt!r} is not supported (qcow2 or raw)")
        self.path = path
        self.name = name or os.path.basename(path)
        self.writable = writable
        self.change_token: str | None = None  # DiskReader fields: no change tracking here
        self.dirty_since: str | None = None
        self.bitmap = bitmap
        self._dirty_context = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
        self._lock = threading.Lock()
        self._h: Any = None
        # Not a temporary file: a SIGKILLed run left one per open image (crash tests).
        self._log_fd: int | None = os.memfd_create("vmkeep-qemu-nbd-log")
        self._log = f"/proc/{os.getpid()}/fd/{self._log_fd}"
        try:
            self._h = self._connect(fmt)
            self.size: int = int(self._h.get_size())
            if writable and (not self._h.can_zero() or not self._h.can_flush()):
                raise ConnectorError(f"{self.name}: qemu-nbd offers no write-zeroes or flush")
            if self._dirty_context and not self._h.can_meta_context(self._dirty_context):
                raise ConnectorError(f"{self.name}: qemu-nbd does not export {bitmap}")
        except BaseException:
            self._drop()
            raise

    def _connect(self, fmt: str) -> Any:
        mod = nbd()
        argv = ["qemu-nbd", *qemu_nbd_options(fmt, self.writable, self.bitmap)]
        h = nbd_handle()
        try:
            self.add_contexts(h)
            h.connect_systemd_socket_activation(
                [*_DIE_WITH_VMKEEP, self._log, str(os.getpid()), *argv, self.path]
            )
        except mod.Error as exc:
            with contextlib.suppress(Exception):
                h.shutdown()
            del h
            reason = self._qemu_nbd_error() or one_line(exc)
            raise ConnectorError(f"cannot open {self.path} with qemu-nbd: {reason}") from None
        return h

    def add_contexts(self, h: Any) -> None:
        """The meta contexts to ask for, before connecting."""
        h.add_meta_context(BASE_ALLOCATION)
        if self._dirty_context:
            h.add_meta_context(self._dirty_context)

    def _qemu_nbd_error(self) -> str:
        """qemu-nbd's own message, without its "qemu-nbd: " prefixes, on one line."""
        if self._log_fd is None:
            return ""
        try:
            text = os.pread(self._log_fd, 4096, 0).decode("utf-8", "replace")
        except OSError:
            return ""
        return " ".join(line.removeprefix("qemu-nbd: ").strip() for line in text.splitlines())

    def _handle(self) -> Any:
        h = self._h
        if h is None:
            raise ConnectorError(f"{self.name}: image is closed")
        return h

    def _fail(self, what: str, offset: int, exc: Exception) -> ConnectorError:
        return ConnectorError(f"{self.name}: NBD {what} at {offset}: {one_line(exc)}")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ConnectorError(
                f"{self.name}: range {offset}+{length} is outside the disk (size {self.size})"
            )

    # -- DiskReader
    def extents(self) -> Iterator[Extent]:
        """Data and hole extents from base:allocation covering [0, size), adjacent ones merged."""
        zero = int(nbd().STATE_ZERO)
        return merged_extents(
            Extent(off, n, not flags & zero) for off, n, flags in self._status(BASE_ALLOCATION)
        )

    def _status(self, context: str) -> Iterator[tuple[int, int, int]]:
        offset = 0
        while offset < self.size:
            got: list[int] = []
            try:
                collect = status_collector(context, got)
                self._handle().block_status(min(STATUS_STEP, self.size - offset), offset, collect)
            except nbd().Error as exc:
                raise self._fail("block status", offset, exc) from None
            if not got:
                raise ConnectorError(f"{self.name}: qemu-nbd sent no {context} extents")
            for i in range(0, len(got) - 1, 2):
                n = min(got[i], self.size - offset)
                if n <= 0:
                    break
                yield offset, n, got[i + 1]
                offset += n

    def dirty_extents(self) -> Iterator[Extent]:
        """The ranges `bitmap` marks; without one, everything (unknown)."""
        if self._dirty_context is None:
            yield Extent(0, self.size, data=True)
            return
        dirty = self._status(self._dirty_context)
        for ext in merged_extents(Extent(off, n, bool(f & DIRTY)) for off, n, f in dirty):
            if ext.data:
                yield ext

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`, fewer only at the end of the disk."""
        length = max(0, min(length, self.size - offset))
        self._check_range(offset, length)
        h = self._handle()
        parts = []
        pos = offset
        try:
            while pos < offset + length:
                n = min(MAX_REQUEST, offset + length - pos)
                parts.append(h.pread(n, pos))
                pos += n
        except nbd().Error as exc:
            raise self._fail("read", pos, exc) from None
        return b"".join(parts)

    # -- DiskWriter
    def write(self, offset: int, data: bytes) -> None:
        self._check_range(offset, len(data))
        h = self._handle()
        view = memoryview(data)
        pos = 0
        try:
            while pos < len(data):
                n = min(MAX_REQUEST, len(data) - pos)
                h.pwrite(view[pos : pos + n], offset + pos)
                pos += n
        except nbd().Error as exc:
            raise self._fail("write", offset + pos, exc) from None

    def zero(self, offset: int, length: int) -> None:
        """Read as zeros afterwards; qemu-nbd (--discard=unmap) may punch holes to do it."""
        self._check_range(offset, length)
        h = self._handle()
        pos = offset
        try:
            while pos < offset + length:
                n = min(MAX_REQUEST, offset + length - pos)
                h.zero(n, pos)  # no NBD_CMD_FLAG_NO_HOLE: unmapping is allowed
                pos += n
        except nbd().Error as exc:
            raise self._fail("write-zeroes", pos, exc) from None

    def flush(self) -> None:
        """Make every write so far durable in the image file."""
        if not self.writable:
            return
        try:
            self._handle().flush()
        except nbd().Error as exc:
            raise ConnectorError(f"{self.name}: NBD flush: {one_line(exc)}") from None

    def close(self) -> None:
        """Flush (when writable), disconnect and let qemu-nbd exit. A failed flush raises,
        after the connection is gone."""
        with self._lock:
            if self._h is None:
                return
            try:
                self.flush()
            finally:
                self._drop()

    def _drop(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            with contextlib.suppress(Exception):
                h.shutdown()
            del h  # libnbd closes the socket and reaps qemu-nbd
        self._end_server()
        fd, self._log_fd = self._log_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _end_server(self) -> None:
        """After the connection is gone: nothing here (libnbd reaped the local qemu-nbd); a
        qemu-nbd on another host is waited for (ssh_nbd.py)."""

    def __enter__(self) -> NbdImage:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.close()
        else:
            with contextlib.suppress(Exception):
                self.close()


def open_image(path: str, fmt: str, *, writable: bool, name: str = "") -> NbdImage:
    """Open `path` (format `fmt`: "qcow2" or "raw"); ConnectorError with qemu-nbd's reason when
    it cannot be opened (missing file, wrong format, locked by a running VM)."""
    return NbdImage(path, fmt, writable=writable, name=name)
