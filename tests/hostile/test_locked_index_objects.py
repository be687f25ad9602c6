"""Hostile locked index objects in a format 3 repository on an immutable directory: whoever
can write the remote plants an index object that does not verify and makes it immutable
(or locks it on S3) so that nobody can remove it. gc must stop in one line rather than
guess which packs it lists, `repair index` must not fail on the object it cannot delete,
and the locked restore point still restores hash-equal (docs/IMMUTABILITY.md, Limits)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import disk_hashes
from tests.immutable_files import immutable_vault
from vmkeep.remotes.file_attributes import set_immutable

from .conftest import Cli, one_error_line


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Path]:
    yield from immutable_vault(tmp_path)


def test_a_planted_locked_index_object_stops_gc_but_not_restores(
    cli: Cli, vault: Path, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    cli("remote", "add", "vault", str(vault), "--lock-days", "1")
    vm = make_vm(size=32 * 1024 * 1024)
    point = cli("backup", str(vm), "--json").json()["restore_point"]
    want = disk_hashes(vm)
    planted = vault / "index" / ("ab" * 32)
    planted.write_bytes(b"VMKI not an index object")
    fd = os.open(planted, os.O_RDONLY)
    try:
        set_immutable(fd, True)
    finally:
        os.close(fd)
    packs_before = sorted(p.name for p in (vault / "packs").rglob("*") if p.is_file())

    line = one_error_line(cli("gc", ok=False))
    assert "unreadable" in line and "repair index" in line
    repaired = cli("repair", "index", "--json").json()
    assert repaired["index_objects_written"] >= 1
    assert planted.exists()  # immutable: kept, not a failure of the repair
    assert sorted(p.name for p in (vault / "packs").rglob("*") if p.is_file()) == packs_before
    one_error_line(cli("gc", ok=False))  # still stopped while the planted object is locked

    out = cli("restore", point, "--to", str(tmp_path / "r"), "--json").json()
    assert disk_hashes(Path(out["location"])) == want
