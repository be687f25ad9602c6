"""Restore keeps holes: the runs data_runs finds must be exactly the non-zero 4 KiB blocks,
including on the fast path that skips the block loop when a chunk holds no zero block."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from vmkeep.connectors.files.raw import RawDiskReader, RawDiskWriter
from vmkeep.operations.restore import SPARSE_BLOCK, data_runs, sparse_pieces, write_pieces


def reference_runs(data: bytes) -> list[tuple[int, int]]:
    """Block by block, the obvious way."""
    runs: list[tuple[int, int]] = []
    for pos in range(0, len(data), SPARSE_BLOCK):
        block = data[pos : pos + SPARSE_BLOCK]
        if block.count(0) == len(block):
            continue
        end = min(pos + SPARSE_BLOCK, len(data))
        if runs and runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((pos, end))
    return runs


piece = st.one_of(
    st.integers(1, 3 * SPARSE_BLOCK).map(bytes),  # zeros
    st.binary(min_size=1, max_size=3 * SPARSE_BLOCK).filter(lambda b: any(b)),
    st.sampled_from([b"\x00" * (SPARSE_BLOCK - 1) + b"\x01", b"\x01" + bytes(SPARSE_BLOCK)]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(piece, max_size=8))
def test_runs_are_the_nonzero_blocks(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert list(data_runs(data)) == reference_runs(data)


def test_a_zero_block_off_the_grid_is_data() -> None:
    """4 KiB of zeros straddling two blocks is not a hole: both blocks hold data."""
    data = b"\x01" * 100 + bytes(SPARSE_BLOCK) + b"\x01" * (SPARSE_BLOCK - 100)
    assert list(data_runs(data)) == [(0, 2 * SPARSE_BLOCK)]


# A block that is zero at the bytes data_runs samples first (0, middle, last) but holds data
DECOY = bytes(100) + b"\x07" + bytes(SPARSE_BLOCK - 101)
long_piece = st.one_of(
    st.integers(1, 40 * SPARSE_BLOCK).map(bytes),  # zero runs past the 64 KiB stride
    st.integers(1, 3).map(lambda n: DECOY * n),
    st.binary(min_size=1, max_size=SPARSE_BLOCK).filter(lambda b: any(b)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(long_piece, max_size=10))
def test_runs_with_long_zero_runs_and_decoys(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert list(data_runs(data)) == reference_runs(data)


def test_decoy_blocks_are_data() -> None:
    data = bytes(20 * SPARSE_BLOCK) + DECOY + bytes(SPARSE_BLOCK) + DECOY + b"\x01"
    assert list(data_runs(data)) == [
        (20 * SPARSE_BLOCK, 21 * SPARSE_BLOCK),
        (22 * SPARSE_BLOCK, len(data)),
    ]


BLOCK = 16 * SPARSE_BLOCK  # a format 3 block (64 KiB); every block but a chunk's last is whole
block_part = st.one_of(
    st.sampled_from([bytes(BLOCK), DECOY * 16]),
    st.binary(min_size=1, max_size=3 * SPARSE_BLOCK).map(lambda b: (b * BLOCK)[:BLOCK]),
    st.integers(0, 15).map(lambda k: bytes(k * SPARSE_BLOCK) + b"\x09" * (16 - k) * SPARSE_BLOCK),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(block_part, min_size=1, max_size=6), st.integers(1, 16 * SPARSE_BLOCK - 1))
def test_pieces_of_parts_are_the_nonzero_blocks(parts: list[bytes], tail: int) -> None:
    """A format 3 chunk arrives as its blocks (a shorter last one): the pieces written are
    exactly the data runs of the joined chunk, and they carry its bytes."""
    parts[-1] = parts[-1][:tail]
    data = b"".join(parts)
    pieces = sparse_pieces(parts)
    got = [(start, start + sum(len(p) for p in ps)) for start, ps in pieces]
    assert got == reference_runs(data)
    for start, ps in pieces:
        assert b"".join(ps) == data[start : start + len(b"".join(ps))]


def test_pieces_land_the_same_through_write_parts_and_a_plain_writer(tmp_path: Path) -> None:
    """RawDiskWriter.write_parts (O_DIRECT or pwritev, no join) and a writer without it
    (joined) write the same bytes, holes where the chunk's blocks are zero."""
    size = 3 * 16 * SPARSE_BLOCK + 100
    parts = [os.urandom(16 * SPARSE_BLOCK), bytes(16 * SPARSE_BLOCK), DECOY * 16, b"\x05" * 100]
    parts[0] = (
        parts[0][: 8 * SPARSE_BLOCK] + bytes(4 * SPARSE_BLOCK) + parts[0][12 * SPARSE_BLOCK :]
    )
    image = b"".join(parts)

    class Plain:
        def __init__(self) -> None:
            self.out = bytearray(size)

        def write(self, offset: int, data: bytes) -> None:
            self.out[offset : offset + len(data)] = data

    plain = Plain()
    assert write_pieces(plain, 0, sparse_pieces(parts)) == sum(  # type: ignore[arg-type]
        e - s for s, e in reference_runs(image)
    )
    assert bytes(plain.out) == image
    raw = RawDiskWriter(tmp_path / "d.raw", size)
    write_pieces(raw, 0, sparse_pieces(parts))
    raw.close()
    assert (tmp_path / "d.raw").read_bytes() == image
    holes = [e for e in RawDiskReader(tmp_path / "d.raw").extents() if not e.data]
    assert any(h.offset <= 16 * SPARSE_BLOCK and h.offset + h.length >= 32 * SPARSE_BLOCK
               for h in holes)  # fmt: skip
