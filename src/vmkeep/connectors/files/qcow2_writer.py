"""Writes a fresh qcow2 v3 image (64 KiB clusters) from restore writes arriving in any order.

Why this layout: clusters are appended as they are first written, L1/L2 tables live in memory
until `close`, and the refcount structures are written last, after the final cluster count is
known. Every cluster the file uses has refcount 1, so `qemu-img check` finds nothing to fix."""

from __future__ import annotations

import contextlib
import os
from array import array
from pathlib import Path

from vmkeep.connectors.files.direct_io import (
    DirectWrites,
)
from vmkeep.connectors.files.fileio import (
    check_write,
    open_image,
    punch_hole,
    pwrite_all,
    pwritev_all,
)
from vmkeep.connectors.files.image_file import ImageFile
from vmkeep.connectors.files.qcow2 import (
    HEADER_V2,
    HEADER_V3_EXTRA,
    MAGIC,
    MAX_L1_BYTES,
    OFFSET_MASK,
    OFLAG_COPIED,
    OFLAG_ZERO,
    V3_HEADER_LENGTH,
)
from vmkeep.errors import ConnectorError

REFCOUNT_ORDER = 4  # 16-bit refcounts, qemu's default
_MAX_PARTS = 1024  # IOV_MAX: pieces one pwritev may take


class Qcow2DiskWriter(ImageFile):
    """A new qcow2 image of virtual `size` bytes at `path`, which must not exist (a planted
    symlink is never followed); `replace_existing`: truncate the existing regular file there
    (one the caller just created: a libvirt volume, a mkstemp file). `within`: see
    fileio.open_image.
    Unwritten clusters stay unallocated, and all-zero writes to them allocate nothing.
    The size is rounded up to a multiple of 512 as `qemu-img create` does: qemu ignores a
    partial last sector of a qcow2 image."""

    def __init__(
        self,
        path: Path | str,
        size: int,
        *,
        cluster_bits: int = 16,
        replace_existing: bool = False,
        within: Path | None = None,
    ) -> None:
        if size < 0 or not 9 <= cluster_bits <= 21:
            raise ValueError("invalid disk size or cluster size")
        self.path = Path(path)
        self.size = -(-size // 512) * 512
        self._bits = cluster_bits
        self._cs = 1 << cluster_bits
        self._l2_entries = self._cs // 8
        l1_size = -(-self.size // (self._cs * self._l2_entries))
        if l1_size * 8 > MAX_L1_BYTES:
            raise ConnectorError(f"{self.path}: a disk of {size} bytes is too large for qcow2")
        flags = os.O_RDWR | (os.O_TRUNC if replace_existing else os.O_CREAT)
        self._fd = open_image(self.path, flags, within=within)
        self._l1 = [0] * l1_size  # host offsets of the L2 tables, 0 = none yet
        self._l2: dict[int, array[int]] = {}
        self._l1_offset = self._cs
        self._next = (1 + -(-l1_size * 8 // self._cs)) * self._cs  # first free cluster
        self._zero_bytes = bytes(self._cs)
        self._zero = memoryview(self._zero_bytes)
        # Data clusters are written with O_DIRECT where the file system suits (as raw
        # images are: direct_io.py); the tables and header at close go through the cache.
        self._direct = DirectWrites(str(self.path), self._fd)

    def _allocate(self) -> int:
        host = self._next
        self._next += self._cs
        return host

    def _entry(self, cluster: int) -> int:
        table = self._l2.get(cluster // self._l2_entries)
        return 0 if table is None else table[cluster % self._l2_entries]

    def _set_entry(self, cluster: int, value: int) -> None:
        l1_index, index = divmod(cluster, self._l2_entries)
        table = self._l2.get(l1_index)
        if table is None:
            table = array("Q", bytes(self._cs))
            self._l2[l1_index] = table
            self._l1[l1_index] = self._allocate()
        table[index] = value

    def _check(self, offset: int, length: int) -> None:
        check_write(self.path, self._fd, self.size, offset, length)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write anywhere; partial clusters keep their other bytes (zeros if new)."""
        self._check(offset, len(data))
        self._write_batch(self._plan(offset, data))

    def write_parts(self, offset: int, parts: list[bytes]) -> None:
        """Write consecutive parts at `offset`, as one write of their concatenation would
        (new clusters of all parts land side by side: one write), without joining them."""
        self._check(offset, sum(len(p) for p in parts))
        batch: list[tuple[int, bytes | bytearray | memoryview]] = []
        for part in parts:
            batch += self._plan(offset, part)
            offset += len(part)
        self._write_batch(batch)

    def _plan(
        self, offset: int, data: bytes | memoryview
    ) -> list[tuple[int, bytes | bytearray | memoryview]]:
        """(host offset, bytes) of each cluster piece of a write, allocating new clusters in
        order; zeros over a cluster that holds none are left out."""
        view = memoryview(data)
        batch: list[tuple[int, bytes | bytearray | memoryview]] = []
        pos, end = offset, offset + len(data)
        while pos < end:
            cluster, intra = divmod(pos, self._cs)
            n = min(self._cs - intra, end - pos)
            piece = view[pos - offset : pos - offset + n]
            entry = self._entry(cluster)
            host = entry & OFFSET_MASK
            if host and not entry & OFLAG_ZERO:
                batch.append((host + intra, piece))
            elif not self._zero_bytes.startswith(piece):  # zeros over a zero cluster: no-op
                host = host or self._allocate()
                if n == self._cs:
                    batch.append((host, piece))
                else:
                    buf = bytearray(self._cs)
                    buf[intra : intra + n] = piece
                    batch.append((host, buf))
                self._set_entry(cluster, host | OFLAG_COPIED)
            pos += n
        return batch

    def _write_batch(self, batch: list[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Write the pieces, those contiguous in the file with one call and no join (pwritev,
        or one O_DIRECT write when the run is aligned)."""
        i = 0
        try:
            while i < len(batch):
                start, first = batch[i]
                parts = [first]
                stop = start + len(first)
                i += 1
                while i < len(batch) and batch[i][0] == stop and len(parts) < _MAX_PARTS:
                    parts.append(batch[i][1])
                    stop += len(batch[i][1])
                    i += 1
                if not self._write_direct(start, stop - start, parts):
                    self._drain()  # a buffered write must not race a direct one in flight
                    pwritev_all(self._fd, parts, start)
        except OSError as exc:
            raise ConnectorError(f"cannot write {self.path}: {exc.strerror}") from None

    def _write_direct(
        self, start: int, length: int, parts: list[bytes | bytearray | memoryview]
    ) -> bool:
        return self._direct.write(parts, start, length)

    def _drain(self) -> None:
        self._direct.drain()

    def zero(self, offset: int, length: int) -> None:
        """Whole clusters get the zero flag (their space punched); partial ones get zeros."""
        length = max(0, min(length, self.size - offset))
        self._check(offset, length)
        try:
            self._drain()  # no direct write in flight under a hole being punched
        except OSError as exc:
            raise ConnectorError(f"cannot write {self.path}: {exc.strerror}") from None
        pos, end = offset, offset + length
        batch: list[tuple[int, bytes | bytearray | memoryview]] = []
        while pos < end:
            cluster, intra = divmod(pos, self._cs)
            n = min(self._cs - intra, end - pos)
            entry = self._entry(cluster)
            host = entry & OFFSET_MASK
            if host and not entry & OFLAG_ZERO:
                if intra == 0 and (n == self._cs or pos + n == self.size):
                    self._set_entry(cluster, host | OFLAG_COPIED | OFLAG_ZERO)
                    with contextlib.suppress(OSError):  # the zero flag alone suffices
                        punch_hole(self._fd, host, self._cs)
                else:
                    batch.append((host + intra, self._zero[:n]))
            pos += n
        self._write_batch(batch)

    def _before_finish(self) -> None:
        self._drain()

    def _release(self) -> None:
        self._direct.close()

    def _finish(self) -> None:
        """At close: its tables, refcounts and header."""
        for l1_index, table in self._l2.items():
            pwrite_all(self._fd, _be_bytes(table), self._l1[l1_index])
        l1 = array("Q", [(e | OFLAG_COPIED) if e else 0 for e in self._l1])
        pwrite_all(self._fd, _be_bytes(l1), self._l1_offset)
        used = self._next // self._cs
        per_block = self._cs * 8 >> REFCOUNT_ORDER
        blocks = table_clusters = 0
        while True:  # the refcount structures must count themselves too
            total = used + blocks + table_clusters
            need_blocks = -(-total // per_block)
            need_table = -(-need_blocks * 8 // self._cs)
            if (need_blocks, need_table) == (blocks, table_clusters):
                break
            blocks, table_clusters = need_blocks, need_table
        total = used + blocks + table_clusters
        one = (1).to_bytes(2, "big")
        for b in range(blocks):
            count = min(per_block, total - b * per_block)
            block = one * count + bytes(self._cs - 2 * count)
            pwrite_all(self._fd, block, (used + b) * self._cs)
        rt_offset = (used + blocks) * self._cs
        rt = array("Q", [(used + b) * self._cs for b in range(blocks)])
        rt_bytes = _be_bytes(rt)
        pwrite_all(self._fd, rt_bytes + bytes(table_clusters * self._cs - len(rt_bytes)), rt_offset)
        header = HEADER_V2.pack(
            MAGIC, 3, 0, 0, self._bits, self.size, 0, len(self._l1), self._l1_offset,
            rt_offset, table_clusters, 0, 0,
        ) + HEADER_V3_EXTRA.pack(0, 0, 0, REFCOUNT_ORDER, V3_HEADER_LENGTH)  # fmt: skip
        header += bytes(V3_HEADER_LENGTH - len(header) + 8)  # deflate, padding, end of extensions
        pwrite_all(self._fd, header, 0)


def _be_bytes(table: array[int]) -> bytes:
    """A table of 64-bit entries in the image's big-endian byte order."""
    if array("H", [1]).tobytes() != b"\x00\x01":
        table = array("Q", table)
        table.byteswap()
    return table.tobytes()
