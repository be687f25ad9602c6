"""Restore keeps holes: the runs data_runs finds must be exactly the non-zero 4 KiB blocks,
including on the fast path that skips the block loop when a chunk holds no zero block."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vmkeep.operations.restore import SPARSE_BLOCK, data_runs


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
