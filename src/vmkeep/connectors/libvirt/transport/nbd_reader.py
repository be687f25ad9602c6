"""DiskReader over an NBD export (a libvirt pull-mode backup job) with libnbd.

The engine reads from several threads; one libnbd handle serialises its commands, so readers
keep a small pool of connections to the same export (QEMU allows multi-conn, LIBVIRT-NOTES §4).
Extents come from the `base:allocation` meta context, dirty ranges from
`qemu:dirty-bitmap:<bitmap>` (incremental jobs only). The export is reached over a unix
socket (vmkeep runs on the hypervisor) or TCP, optionally TLS (a remote libvirt URI)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from vmkeep.connectors.base import Extent
from vmkeep.connectors.libvirt.bindings import nbd, nbd_handle, one_line
from vmkeep.errors import ConnectorError

BASE_ALLOCATION = "base:allocation"
# Reads are sent as requests of at most REQUEST bytes (QEMU's own limit is 32 MiB). QEMU's
# NBD server allocates a fresh buffer for each request: with a backup's four 4 MiB reads in
# flight, the freed buffers went back to the kernel and the next ones were faulted in and
# zeroed again (perf: page faults and memcg charging; QEMU's CPU 0.9-1.07 s for 2 GiB of
# data); in 1 MiB requests the buffers are reused: 0.69-0.80 s, and the reads arrive sooner
# (docs/DATA-PATH.md, "Wall time of a live full backup and restore"). The cost on this side
# is one join of the replies per chunk.
REQUEST = 1 << 20
STATUS_STEP = 1 << 30  # block_status count hint; some servers refuse >= 4 GiB
DIRTY = 1  # flag of a dirty extent in a qemu:dirty-bitmap context
# A backup reads holes shorter than this with the data around them (operations/chunk_extents.py):
# an NBD request is a round trip (~0.1 ms on a unix socket, more over TCP), and in that time
# QEMU serves about 128 KiB of a hole as zeros.
MERGE_HOLES_BELOW = 128 << 10


@dataclass(frozen=True)
class NbdServer:
    """Where an NBD server listens: a unix `socket`, or `host`:`port` over TCP. With `tls`
    the connection must be TLS (client certificates from `tls_certificates`, a directory with
    ca-cert.pem, client-cert.pem, client-key.pem; "" = libnbd's default); without it the TCP
    stream is plain and unencrypted."""

    socket: str = ""
    host: str = ""
    port: int = 0
    tls: bool = False
    tls_certificates: str = ""

    def __str__(self) -> str:
        if self.socket:
            return self.socket
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'nbds' if self.tls else 'nbd'}://{host}:{self.port}"

    def connect(self, h: Any) -> None:
        """Connect libnbd handle `h` (export name and meta contexts already set)."""
        if self.socket:
            h.connect_unix(self.socket)
            return
        if self.tls:
            h.set_tls(nbd().TLS_REQUIRE)
            if self.tls_certificates:
                h.set_tls_certificates(self.tls_certificates)
        h.connect_tcp(self.host, str(self.port))


class NbdDiskReader:
    """A point-in-time view of one disk exported by a backup job. Thread-safe. `server`: an
    NbdServer, or a unix socket path."""

    merge_holes_below = MERGE_HOLES_BELOW

    def __init__(
        self,
        server: str | NbdServer,
        export: str,
        *,
        name: str,
        change_token: str | None,
        dirty_bitmap: str | None = None,
        dirty_since: str | None = None,
        max_connections: int = 8,
    ) -> None:
        self.server = server if isinstance(server, NbdServer) else NbdServer(socket=server)
        self.export = export
        self.name = name
        self.change_token = change_token
        self.dirty_since = dirty_since  # the checkpoint dirty_extents() is relative to
        self._dirty_context = f"qemu:dirty-bitmap:{dirty_bitmap}" if dirty_bitmap else None
        self._max = max(1, max_connections)
        self._cond = threading.Condition()
        self._free: list[Any] = []
        self._count = 0
        self._closed = False
        self._lost = False  # a connection broke: the export is gone, never connect again
        first = self._connect()
        opened = [first]
        try:
            self.size: int = int(first.get_size())
            if self._dirty_context and not first.can_meta_context(self._dirty_context):
                raise ConnectorError(
                    f"disk {name}: the backup job does not export {self._dirty_context}"
                )
            # Every connection now, none later: a client connecting while QEMU stops the NBD
            # server (job aborted, VM stopped) held up its nbd-server-stop, and with it
            # libvirt's lock on the domain, for about a minute (QEMU 7.2, LIBVIRT-NOTES §16).
            # In parallel: a TCP handshake with QEMU takes ~90 ms (delayed ACKs).
            self._connect_more(opened)
        except nbd().Error as exc:
            _shutdown_all(opened)
            raise ConnectorError(f"disk {name}: NBD: {one_line(exc)}") from None
        except BaseException:
            _shutdown_all(opened)
            raise
        self._free.extend(opened)
        self._count = len(opened)

    # -- connections
    def _connect_more(self, opened: list[Any]) -> None:
        """Open connections in parallel until `opened` has `max_connections`; on an error
        `opened` still lists every one that was made (the caller shuts them down)."""
        missing = self._max - len(opened)
        if missing <= 0:
            return
        with ThreadPoolExecutor(missing) as pool:
            futures = [pool.submit(self._connect) for _ in range(missing)]
        failed: BaseException | None = None
        for f in futures:
            exc = f.exception()
            if exc is None:
                opened.append(f.result())
            elif failed is None:
                failed = exc
        if failed is not None:
            raise failed

    def _connect(self) -> Any:
        mod = nbd()
        h = nbd_handle()
        try:
            h.set_export_name(self.export)
            h.add_meta_context(BASE_ALLOCATION)
            if self._dirty_context:
                h.add_meta_context(self._dirty_context)
            self.server.connect(h)
        except mod.Error as exc:
            _shutdown(h)
            raise ConnectorError(
                f"disk {self.name}: cannot connect to the backup job's NBD export "
                f"{self.export!r} at {self.server}: {one_line(exc)}"
            ) from None
        return h

    def _acquire(self) -> Any:
        with self._cond:
            while True:
                if self._closed:
                    raise ConnectorError(f"disk {self.name}: reader is closed")
                if self._free:
                    return self._free.pop()
                if self._lost:
                    raise ConnectorError(
                        f"disk {self.name}: the NBD export at {self.server} was lost"
                    )
                if self._count < self._max:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            return self._connect()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, h: Any, broken: bool = False) -> None:
        with self._cond:
            if broken or self._closed:
                self._lost = self._lost or broken
                self._count -= 1
                _shutdown(h)
            else:
                self._free.append(h)
            self._cond.notify_all()

    # -- DiskReader
    def _status(self, context: str) -> Iterator[tuple[int, int, int]]:
        """(offset, length, flags) of `context` covering [0, size) in order."""
        offset = 0
        while offset < self.size:
            got: list[int] = []
            cb = status_collector(context, got)
            h = self._acquire()
            try:
                h.block_status(min(STATUS_STEP, self.size - offset), offset, cb)
            except nbd().Error as exc:
                self._release(h, broken=True)
                raise ConnectorError(
                    f"disk {self.name}: NBD block status: {one_line(exc)}"
                ) from None
            self._release(h)
            if not got:
                raise ConnectorError(f"disk {self.name}: NBD server sent no {context} extents")
            pos = offset
            for i in range(0, len(got) - 1, 2):
                length = min(got[i], self.size - pos)
                if length <= 0:
                    break
                yield pos, length, got[i + 1]
                pos += length
            offset = pos

    def extents(self) -> Iterator[Extent]:
        """Data and zero extents from base:allocation, adjacent ones of a kind merged."""
        zero = int(nbd().STATE_ZERO)
        yield from merged_extents(
            Extent(off, n, data=not flags & zero) for off, n, flags in self._status(BASE_ALLOCATION)
        )

    def dirty_extents(self) -> Iterator[Extent]:
        """Ranges written since `dirty_since` (whole disk when the job is not incremental)."""
        if self._dirty_context is None:
            yield Extent(0, self.size, data=True)
            return
        for ext in merged_extents(
            Extent(off, n, data=bool(flags & DIRTY))
            for off, n, flags in self._status(self._dirty_context)
        ):
            if ext.data:
                yield ext

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        h = self._acquire()
        parts = []
        try:
            pos = offset
            while pos < offset + length:
                n = min(REQUEST, offset + length - pos)
                parts.append(h.pread(n, pos))
                pos += n
        except nbd().Error as exc:
            self._release(h, broken=True)
            raise ConnectorError(
                f"disk {self.name}: NBD read at {offset}: {one_line(exc)}"
            ) from None
        self._release(h)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Disconnect every connection; idempotent."""
        with self._cond:
            self._closed = True
            free, self._free = self._free, []
            self._count -= len(free)
            self._cond.notify_all()
        for h in free:
            _shutdown(h)


def status_collector(context: str, into: list[int]) -> Any:
    """A block_status callback keeping the entries of `context`. It runs under the handle's
    lock: it must not call nbd_* functions."""

    def cb(metacontext: str, _off: int, entries: list[int], _err: Any) -> int:
        if metacontext == context:
            into.extend(entries)
        return 0

    return cb


def merged_extents(extents: Iterator[Extent]) -> Iterator[Extent]:
    """Adjacent extents of the same kind as one (block status answers in small pieces)."""
    cur: Extent | None = None
    for e in extents:
        if cur is not None and cur.data == e.data and cur.offset + cur.length == e.offset:
            cur = Extent(cur.offset, cur.length + e.length, cur.data)
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


def _shutdown_all(handles: list[Any]) -> None:
    for h in handles:
        _shutdown(h)


def _shutdown(h: Any) -> None:
    with contextlib.suppress(Exception):
        h.shutdown()
