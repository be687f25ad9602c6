"""In-memory replay of an ext3/4 journal (JBD2), for a file system backed up while mounted
(a crash-consistent backup): the committed transactions the kernel had not yet written in
place are laid over the volume's blocks, read-only, as `e2fsck` or a mount would replay them.
Nothing is written; the overlay maps file system blocks to journal blocks (memory bounded by
the journal's length, a few tens of thousands of entries at most).

What is read (Linux's fs/jbd2/recovery.c, the on-disk format in include/linux/jbd2.h; all
fields big-endian): from the journal superblock's s_start, blocks whose header carries the
magic and the expected sequence; descriptor blocks list the file system blocks of the data
blocks that follow them (tags, 64-bit and checksum-v2/v3 layouts, escaped magic); revoke
blocks cancel earlier copies; a commit block closes a transaction. A transaction without its
commit block is not replayed. Checksums are not verified (replay stops at the first block
that is not the next one expected, as recovery does)."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

MAGIC = 0xC03B3998
DESCRIPTOR, COMMIT, REVOKE = 1, 2, 5
INCOMPAT_64BIT, INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3 = 0x2, 0x8, 0x10
FLAG_ESCAPE, FLAG_SAME_UUID, FLAG_LAST_TAG = 0x1, 0x2, 0x8


@dataclass
class Replay:
    blocks: dict[int, int] = field(default_factory=dict)  # fs block -> journal block
    escaped: set[int] = field(default_factory=set)  # fs blocks whose magic was escaped
    transactions: int = 0


@dataclass
class _Layout:
    block_size: int
    maxlen: int
    first: int
    tag_size: int
    tail: int
    wide: bool


def plan(journal: BinaryIO, fs_block_size: int) -> Replay | None:
    """What to replay, or None when the journal is clean (s_start 0) or not JBD2."""
    journal.seek(0)
    sb = journal.read(1024)
    if len(sb) < 1024:
        return None
    magic, _, _ = struct.unpack_from(">III", sb, 0)
    block_size, maxlen, first, sequence, start = struct.unpack_from(">IIIII", sb, 12)
    (incompat,) = struct.unpack_from(">I", sb, 0x28)
    if (
        magic != MAGIC
        or start == 0
        or block_size != fs_block_size
        or not 0 < first <= start < maxlen
    ):
        return None
    wide = bool(incompat & INCOMPAT_64BIT)
    if incompat & INCOMPAT_CSUM_V3:
        tag_size = 16
    else:  # Linux's journal_tag_bytes()
        tag_size = (12 if wide else 8) + (2 if incompat & INCOMPAT_CSUM_V2 else 0)
    tail = 4 if incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) else 0
    layout = _Layout(block_size, maxlen, first, tag_size, tail, wide)
    return _replay(journal, layout, start, sequence)


def _replay(journal: BinaryIO, layout: _Layout, start: int, sequence: int) -> Replay:
    committed: list[tuple[int, list[tuple[int, int, bool]]]] = []
    revoked: dict[int, int] = {}
    pending: list[tuple[int, int, bool]] = []
    pos, seq, steps = start, sequence, 0
    while steps < layout.maxlen:
        block = _read(journal, layout, pos)
        magic, kind, block_seq = struct.unpack_from(">III", block, 0)
        if magic != MAGIC or block_seq != seq:
            break
        if kind == DESCRIPTOR:
            for fs_block, escaped in _tags(block, layout):
                pos = _next(pos, layout)
                steps += 1
                pending.append((fs_block, pos, escaped))
        elif kind == REVOKE:
            for fs_block in _revoked(block, layout):
                revoked[fs_block] = max(revoked.get(fs_block, -1), seq)
        elif kind == COMMIT:
            committed.append((seq, pending))
            pending, seq = [], seq + 1
        else:
            break
        pos = _next(pos, layout)
        steps += 1
    out = Replay(transactions=len(committed))
    for tid, tags in committed:
        for fs_block, journal_block, escaped in tags:
            if revoked.get(fs_block, -1) >= tid:  # revoked in this or a later transaction
                continue
            out.blocks[fs_block] = journal_block
            if escaped:
                out.escaped.add(fs_block)
            else:
                out.escaped.discard(fs_block)
    return out


def _tags(block: bytes, layout: _Layout) -> list[tuple[int, bool]]:
    tags = []
    at, end = 12, len(block) - layout.tail
    while at + layout.tag_size <= end:
        if layout.tag_size == 16:
            low, flags, high, _ = struct.unpack_from(">IIII", block, at)
        else:
            low, _, flags = struct.unpack_from(">IHH", block, at)
            high = struct.unpack_from(">I", block, at + 8)[0] if layout.wide else 0
        tags.append(((high << 32) | low if layout.wide else low, bool(flags & FLAG_ESCAPE)))
        at += layout.tag_size + (0 if flags & FLAG_SAME_UUID else 16)
        if flags & FLAG_LAST_TAG:
            break
    return tags


def _revoked(block: bytes, layout: _Layout) -> list[int]:
    (count,) = struct.unpack_from(">I", block, 12)
    size = 8 if layout.wide else 4
    end = min(count, len(block) - layout.tail)
    return [int.from_bytes(block[at : at + size], "big") for at in range(16, end - size + 1, size)]


def _next(pos: int, layout: _Layout) -> int:
    pos += 1
    return layout.first if pos >= layout.maxlen else pos


def _read(journal: BinaryIO, layout: _Layout, pos: int) -> bytes:
    journal.seek(pos * layout.block_size)
    block = journal.read(layout.block_size)
    return block.ljust(layout.block_size, b"\0")


class ReplayedVolume:
    """The volume with the journal's committed blocks laid over it, read-only (a Preadable:
    vmkeep/pread_file.py gives it a position)."""

    def __init__(self, base: BinaryIO, journal: BinaryIO, replay: Replay, block_size: int) -> None:
        self.base, self.journal, self.replay = base, journal, replay
        self.block_size = block_size
        self.size = base.seek(0, io.SEEK_END)

    def pread(self, offset: int, length: int) -> bytes:
        self.base.seek(offset)
        data = bytearray(self.base.read(length))
        start, end = offset, offset + len(data)
        for fs_block in range(start // self.block_size, -(-end // self.block_size)):
            journal_block = self.replay.blocks.get(fs_block)
            if journal_block is None:
                continue
            self.journal.seek(journal_block * self.block_size)
            copy = bytearray(self.journal.read(self.block_size).ljust(self.block_size, b"\0"))
            if fs_block in self.replay.escaped:
                copy[0:4] = struct.pack(">I", MAGIC)
            lo, hi = fs_block * self.block_size, (fs_block + 1) * self.block_size
            a, b = max(lo, start), min(hi, end)
            data[a - start : b - start] = copy[a - lo : b - lo]
        return bytes(data)
