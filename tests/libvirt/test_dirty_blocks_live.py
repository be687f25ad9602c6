"""A live delta into a format 3 repository reads only the 128 KiB blocks its dirty bitmap
(64 KiB granules) touches, not the dirty 4 MiB chunks whole (operations/dirty_blocks.py); a
second delta takes the unchanged blocks from the first delta's recipes; every point restores
hash-equal."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tests.libvirt import libvirt_env as lv
from tests.libvirt.backup_points import backup, models, restored_hashes
from tests.libvirt.conftest import LibvirtEnv
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, lv.MiB
CHUNK, BLOCK, GRANULE = 4 * MiB, 128 * KiB, lv.DEFAULT_GRANULARITY


def blocks_touched(writes: list[tuple[int, int]]) -> set[int]:
    """The 128 KiB blocks the dirty granules of (offset, length) writes cover."""
    out = set()
    for offset, length in writes:
        first = offset // GRANULE * GRANULE
        end = -(-(offset + length) // GRANULE) * GRANULE
        out |= set(range(first // BLOCK, -(-end // BLOCK)))
    return out


def test_live_format3_delta_reads_only_dirty_blocks(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    connector: LibvirtConnector,
    tmp_path: Path,
) -> None:
    repo = Repository.init(
        LocalRemote(tmp_path / "repo"),
        "aes-256-gcm",
        lambda: b"pw",
        format_version=3,
        block_size=BLOCK,  # blocks of two dirty granules: the rounding out is what is tested
    )
    d = make_domain((32 * MiB,))
    d.guest_write("vda", 0, os.urandom(12 * MiB))  # chunks 0-2, all data
    d.guest_write("vda", 20 * MiB, 0x5A, 4 * MiB)  # chunk 5, compressible
    full = backup(repo, connector, d, "full")
    assert full.stats.bytes_read == 16 * MiB
    points = [(full.restore_point, models(d))]

    rounds = [
        # scattered 64 KiB writes, one across two blocks, one across chunks 0 and 1, a small
        # unaligned one; never more than 3/4 of a chunk
        [
            (64 * KiB, 64 * KiB),
            (MiB + 100 * KiB, 64 * KiB),
            (CHUNK - 32 * KiB, 64 * KiB),
            (2 * CHUNK + 3 * MiB, 64 * KiB),
            (5 * CHUNK + 777, 4096),
        ],
        # again, partly in blocks the first round changed (their recipes are the delta's)
        [(64 * KiB + 4096, 8192), (MiB + 512 * KiB, 64 * KiB), (5 * CHUNK + 2 * MiB, 64 * KiB)],
    ]
    for writes in rounds:
        for offset, length in writes:
            d.guest_write("vda", offset, os.urandom(length))
        delta = backup(repo, connector, d, "delta")
        assert not any("full read" in n or "read whole" in n for n in delta.notes), delta.notes
        blocks = blocks_touched(writes)
        chunks = {b * BLOCK // CHUNK for b in blocks}
        dirty = sum(-(-(o + n) // GRANULE) - o // GRANULE for o, n in writes) * GRANULE
        # every touched block lies in written data: exactly those blocks are read
        assert delta.stats.bytes_read == len(blocks) * BLOCK, delta.to_json()
        assert delta.stats.bytes_read <= 2 * dirty  # not len(chunks) x 4 MiB
        assert delta.stats.bytes_chunks == len(chunks) * CHUNK
        assert delta.stats.chunks_new == len(chunks)
        points.append((delta.restore_point, models(d)))

    for i, (point, expected) in enumerate(points):
        assert restored_hashes(repo, point, tmp_path / f"restore-{i}") == expected, i
