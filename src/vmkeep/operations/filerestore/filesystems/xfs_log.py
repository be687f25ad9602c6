"""Whether an XFS log is clean: XFS has no dirty flag, but a clean unmount ends the log with
an unmount record, and a crash-consistent copy (a backup without a guest agent) does not.
Like the kernel's log recovery (xlog_find_head, xlog_find_tail): every 512-byte log block
starts with its cycle number (a record header carries it after its magic); the head is where
the cycle number drops, found by bisection; the last record before it is an unmount record
when its first operation has the XLOG_UNMOUNT_TRANS flag. The log is never replayed."""

from __future__ import annotations

import struct
from typing import Any

from vmkeep.errors import ImageError

BB = 512
RECORD_MAGIC = 0xFEEDBABE
UNMOUNT_TRANS = 0x20
CYCLE_SIZE = 32768  # XLOG_HEADER_CYCLE_SIZE: log bytes one header block covers
VERSION_2 = 0x2
SEARCH = 4096  # blocks searched back from the head for the last record header (2 MiB)


def log_is_clean(fh: Any, start: int, length: int) -> bool:
    """True when the internal log at byte `start` (`length` bytes) ends in an unmount record."""
    blocks = length // BB
    if blocks < 2:
        raise ImageError("xfs: the log is too small")
    log = _Log(fh, start, blocks)
    head = log.head()
    for back in range(1, min(SEARCH, blocks) + 1):
        block = (head - back) % blocks
        data = log.block(block)
        if struct.unpack_from(">I", data, 0)[0] == RECORD_MAGIC:
            return log.is_unmount(block, data)
    raise ImageError("xfs: no log record found before the log head")


class _Log:
    def __init__(self, fh: Any, start: int, blocks: int) -> None:
        self.fh = fh
        self.start = start
        self.blocks = blocks

    def block(self, index: int) -> bytes:
        self.fh.seek(self.start + index * BB)
        data: bytes = self.fh.read(BB)
        if len(data) != BB:
            raise ImageError("xfs: the log lies past the end of the volume")
        return data

    def cycle(self, index: int) -> int:
        data = self.block(index)
        first, second = struct.unpack_from(">II", data, 0)
        return int(second if first == RECORD_MAGIC else first)

    def head(self) -> int:
        """The first block of the last cycle: [c c c ... c-1 c-1] -> the first c-1; a log
        written all round in one cycle has its head at 0."""
        first, last = self.cycle(0), self.cycle(self.blocks - 1)
        if first == last:
            return 0
        low, high = 0, self.blocks - 1  # cycle(low) == first, cycle(high) == last
        while high - low > 1:
            middle = (low + high) // 2
            if self.cycle(middle) == first:
                low = middle
            else:
                high = middle
        return high

    def is_unmount(self, index: int, header: bytes) -> bool:
        """Whether the record whose header is at `index` is an unmount record: its first
        operation header (after the header blocks) carries XLOG_UNMOUNT_TRANS."""
        (version,) = struct.unpack_from(">I", header, 8)
        (size,) = struct.unpack_from(">I", header, 320)  # h_size
        header_blocks = 1
        if version & VERSION_2 and size > CYCLE_SIZE:
            header_blocks = -(-size // CYCLE_SIZE)
        first_op = self.block((index + header_blocks) % self.blocks)
        return bool(first_op[9] & UNMOUNT_TRANS)  # xlog_op_header.oh_flags
