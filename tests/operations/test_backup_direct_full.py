"""A format 3 backup whose direct pack writes (LocalRemote.put_direct) run out of space on a
real ext4 (a small loop-mounted image): one `error:` line, no restore point, no temp file
and no partial pack left, every pack that is there whole. Needs root (mount)."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import PASSPHRASE, Cli
from tests.vm_dirs import write_raw_vm_json
from vmkeep.direct_io_fs import direct_io_suits
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.packs import read_trailer
from vmkeep.repository.repository import Repository

MiB = 1 << 20


@pytest.fixture()
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB ext4, loop-mounted: room for a repository, not for 20 MiB of random data."""
    image, mount = tmp_path / "fs.img", tmp_path / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(12 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=60)
    res = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True, timeout=60
    )
    if res.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 here ({res.stderr.strip()}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False, timeout=60)
        image.unlink()


def _vm(parent: Path) -> Path:
    vm = parent / "vm"
    vm.mkdir()
    (vm / "disk0.img").write_bytes(random.Random(7).randbytes(20 * MiB))
    write_raw_vm_json(vm, "full", random.Random(7))
    return vm


def test_a_full_file_system_ends_the_backup_cleanly(small_ext4: Path, tmp_path: Path) -> None:
    assert direct_io_suits(str(small_ext4))
    cli = Cli(tmp_path)
    repo = small_ext4 / "repo"
    cli("init", str(repo), "--pack-size", "1M")
    run = cli("backup", str(_vm(tmp_path)), "--remote", str(repo), ok=False)
    assert run.code != 70
    assert "no space" in run.err.strip().splitlines()[-1]
    assert cli("list", "--remote", str(repo), "--json").json()["restore_points"] == []
    assert not list(repo.rglob(".tmp-*"))  # the refused pack's temp file was removed
    opened = Repository.open(LocalRemote(repo), lambda: PASSPHRASE.encode())
    packs = [p for p in (repo / "packs").glob("*/*")]
    for pack in packs:  # what was published is whole: its trailer names its blobs
        assert read_trailer(opened.sealer, bytes.fromhex(pack.name), pack.read_bytes())
    assert sum(p.stat().st_size for p in packs) < 12 * MiB
