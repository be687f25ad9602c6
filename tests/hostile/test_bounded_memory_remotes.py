"""A format 3 full backup to an object store or an SMB server holds a bounded number of data
packs, whatever the worker count: before, the worker that closed a pack waited with it for an
upload slot, so each of 8 workers could hold one (a backup of 512 MiB of data to SeaweedFS
peaked at 410-430 MiB). The backup and the restore go through the real CLI to a real server
on loopback, their peak RSS is measured (an SMB restore reading 8 MiB READs peaked at
298-313 MiB), and the restore must be hash-equal."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from tests.e2e.test_remotes_cli import remote  # noqa: F401 (the fixture: each server kind)
from tests.vm_dirs import write_raw_vm_json

from .conftest import Cli, measured, sha256

MIB = 1 << 20
PEAK_MIB = 300  # issue 15: peak RSS < 300 MiB for any disk size


def _image(path: Path) -> None:
    """1 GiB sparse, 512 MiB of data in 8 MiB runs with holes between: half random (stored
    as it is), half text-like (zstd shrinks it): the packs fill at both rates."""
    words = [os.urandom(4).hex().encode() for _ in range(4096)]
    with open(path, "wb") as f:
        f.truncate(1 << 30)
        for k in range(64):
            if k % 2:
                data = os.urandom(8 * MIB)
            else:
                line = b" ".join(words[(k * 7 + i) % 4096] for i in range(4096)) + b"\n"
                data = (line * (8 * MIB // len(line) + 1))[: 8 * MIB]
            f.seek(k * 16 * MIB)
            f.write(data)


def test_backup_and_restore_on_a_server_stay_bounded(
    cli: Cli,
    remote: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    _image(vm / "disk0.img")
    write_raw_vm_json(vm, "big", random.Random(15))
    cli("init", remote, "--format", "3")
    m = measured(cli, "backup", str(vm), "--remote", remote, "--json", timeout=600)
    assert m.run.code == 0, m.run.err
    report = json.loads(m.run.out)
    assert report["bytes_read"] == 512 * MIB
    kind = remote.split(":")[0]
    assert m.peak_mib < PEAK_MIB, f"backup to {kind} peaked at {m.peak_mib:.0f} MiB"
    point = report["restore_point"]
    target = str(tmp_path / "r")
    m = measured(cli, "restore", point, "--remote", remote, "--to", target, "--json")
    assert m.run.code == 0, m.run.err
    assert m.peak_mib < PEAK_MIB, f"restore from {kind} peaked at {m.peak_mib:.0f} MiB"
    restored = Path(json.loads(m.run.out)["location"]) / "disk0.img"
    assert sha256(restored) == sha256(vm / "disk0.img")
