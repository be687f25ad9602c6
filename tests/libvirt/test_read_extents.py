"""A live backup over NBD reads only the data extents of each chunk (operations/chunk_extents.py)
and reads across holes under 128 KiB (nbd_reader.MERGE_HOLES_BELOW) rather than paying a round
trip for each small extent: bytes_read says exactly which, and every point restores hash-equal."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.backup_points import backup, models, new_repo, restored_hashes
from tests.libvirt.conftest import LibvirtEnv
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.transport.nbd_reader import MERGE_HOLES_BELOW

KiB, MiB = 1 << 10, lv.MiB
CLUSTER = 64 * KiB  # the test disks' qcow2 cluster: what base:allocation reports as data


@pytest.mark.parametrize("fmt", [1, 3])
def test_full_reads_data_and_only_small_holes_between_it(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    connector: LibvirtConnector,
    tmp_path: Path,
    fmt: int,
) -> None:
    assert 128 * KiB == MERGE_HOLES_BELOW
    d = make_domain((16 * MiB,))
    # chunk 0: 16 clusters 128 KiB apart (64 KiB holes: read through, one request);
    # chunk 1: 8 clusters 512 KiB apart (448 KiB holes: skipped, 8 requests);
    # chunk 2: nothing; chunk 3: one 4 KiB write at its end
    for i in range(16):
        d.guest_write("vda", i * 128 * KiB, os.urandom(4096))
    for i in range(8):
        d.guest_write("vda", 4 * MiB + i * 512 * KiB + 8192, os.urandom(4096))
    d.guest_write("vda", 16 * MiB - 4096, os.urandom(4096))
    repo = new_repo(tmp_path / "repo", fmt)
    full = backup(repo, connector, d, "full")
    merged = 15 * 128 * KiB + CLUSTER  # first cluster to last, the holes between included
    assert full.stats.bytes_read == merged + 8 * CLUSTER + CLUSTER, full.to_json()
    assert full.stats.bytes_chunks == 3 * 4 * MiB, full.to_json()  # chunk 2 has no data
    points = [(full.restore_point, models(d))]

    # format 1: a delta reads the dirty chunks' data extents the same way; format 3 reads
    # only the 64 KiB blocks the two writes dirtied (docs/DATA-PATH.md)
    d.guest_write("vda", 4 * MiB + 3 * 512 * KiB + 100, os.urandom(10))
    d.guest_write("vda", 8 * MiB + 2 * MiB, os.urandom(4096))  # chunk 2's first data
    delta = backup(repo, connector, d, "delta")
    assert not any("full read" in n for n in delta.notes), delta.notes
    assert delta.stats.bytes_chunks == 2 * 4 * MiB, delta.to_json()
    want = 8 * CLUSTER + CLUSTER if fmt == 1 else 2 * CLUSTER
    assert delta.stats.bytes_read == want, delta.to_json()
    points.append((delta.restore_point, models(d)))

    for i, (point, expected) in enumerate(points):
        assert restored_hashes(repo, point, tmp_path / f"restore-{i}") == expected, i
