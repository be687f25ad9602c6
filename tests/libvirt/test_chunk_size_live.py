"""A live delta into a 256 KiB-chunk repository: the dirty bitmap (64 KiB granularity) maps to
256 KiB chunks, the delta reads exactly the touched ones, and every point restores hash-equal."""

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
CHUNK = 256 * KiB


def touched(writes: list[tuple[str, int, int]]) -> int:
    """Bytes of the distinct 256 KiB chunks the (target, offset, length) writes touch."""
    return CHUNK * len(
        {(t, i) for t, off, n in writes for i in range(off // CHUNK, (off + n - 1) // CHUNK + 1)}
    )


def test_live_delta_reads_only_touched_256k_chunks(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    connector: LibvirtConnector,
    tmp_path: Path,
) -> None:
    repo = Repository.init(LocalRemote(tmp_path / "repo"), "aes-256-gcm", lambda: b"pw", CHUNK)
    d = make_domain((32 * MiB, 16 * MiB))
    d.guest_write("vda", 0, os.urandom(3 * MiB))
    d.guest_write("vdb", 8 * MiB, 0x99, MiB)
    full = backup(repo, connector, d, "full")
    assert full.stats.bytes_read == 4 * MiB  # allocated data only, in 256 KiB chunks
    points = [(full.restore_point, models(d))]

    rounds = [
        [("vda", 20 * MiB + 4096, 4096), ("vdb", 8 * MiB + 70 * KiB, 512)],
        # one write across a 256 KiB boundary (2 chunks), two inside one chunk (1)
        [("vda", CHUNK - 2048, 4096), ("vdb", 3 * MiB, 1000), ("vdb", 3 * MiB + 128 * KiB, 8)],
    ]
    for writes in rounds:
        for target, offset, length in writes:
            d.guest_write(target, offset, os.urandom(length))
        delta = backup(repo, connector, d, "delta")
        assert not any("full read" in n for n in delta.notes), delta.notes
        assert delta.stats.bytes_chunks == touched(writes), (writes, delta.notes)
        assert delta.stats.bytes_new == touched(writes)  # every touched chunk is new content
        points.append((delta.restore_point, models(d)))
    assert touched(rounds[1]) == 3 * CHUNK  # 768 KiB of chunks where 4 MiB chunks are 8 MiB

    for i, (point, expected) in enumerate(points):
        assert restored_hashes(repo, point, tmp_path / f"restore-{i}") == expected, i
