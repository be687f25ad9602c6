"""A legitimate thin qcow2 of 1 PiB virtual size with 12 MiB of data: backup, list, verify,
restore (new and in place) and export must take memory and time that follow the data, not
the virtual size (a dense index would be 8 GiB; a flag per chunk 256 MiB)."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from tests.stored_data import data_objects, repo_format
from vmkeep.connectors.files.qcow2 import Qcow2Reader

from .conftest import Cli, measured

PIB = 1 << 50
MIB = 1 << 20
PEAK_MIB = 300
SECONDS = 60
# (offset, length, byte pattern): the start, the middle and the last 4 MiB of the disk
WRITES = [(0, MIB, 0x5A), (512 << 40, 3 * MIB, 0x33), (PIB - 4 * MIB, 4 * MIB, 0x77)]


def _qemu_io(image: Path, *commands: str) -> str:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    proc = subprocess.run([*args, str(image)], capture_output=True, text=True, check=True)
    assert "fail" not in proc.stdout.lower() and "error" not in proc.stdout.lower(), proc.stdout
    return proc.stdout


def _huge_vm(root: Path) -> Path:
    vm = root / "huge"
    vm.mkdir(parents=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(vm / "d.qcow2"), "1P"], check=True
    )
    _qemu_io(vm / "d.qcow2", *(f"write -P {p:#x} {o} {n}" for o, n, p in WRITES))
    doc = {
        "name": "huge",
        "uuid": str(uuid.uuid4()),
        "vcpus": 1,
        "memory_mib": 512,
        "disks": [{"name": "disk0", "file": "d.qcow2", "format": "qcow2"}],
    }
    (vm / "vm.json").write_text(json.dumps(doc))
    return vm


def _data_extents(image: Path) -> list[tuple[int, int]]:
    reader = Qcow2Reader(image)
    try:
        return [(e.offset, e.length) for e in reader.extents() if e.data]
    finally:
        reader.close()


def _check_image(image: Path) -> None:
    """Exactly the written data, everything else holes (read through QEMU itself)."""
    assert _data_extents(image) == [(o, n) for o, n, _ in WRITES]
    _qemu_io(image, *(f"read -P {p:#x} {o} {n}" for o, n, p in WRITES))
    _qemu_io(image, f"read -P 0 {MIB} {MIB}", f"read -P 0 {PIB // 4} {MIB}")
    subprocess.run(["qemu-img", "check", "-q", str(image)], check=True)


def _ok(cli: Cli, *args: str) -> dict[str, object]:
    m = measured(cli, *args, "--json")
    assert m.run.code == 0, m.run.err
    assert m.peak_mib < PEAK_MIB, (args[0], m.peak_mib)
    assert m.seconds < SECONDS, (args[0], m.seconds)
    result: dict[str, object] = json.loads(m.run.out)
    return result


def test_one_pib_thin_disk(cli: Cli, repo_dir: Path, tmp_path: Path) -> None:
    vm = _huge_vm(tmp_path / "vms")
    remote = ("--remote", str(repo_dir))
    backup = _ok(cli, "backup", str(vm), *remote)
    # 8 MiB of data read (only the allocated extents), in 3 chunks of 4 MiB
    assert backup["bytes_read"] == 8 * MIB and backup["bytes_chunks"] == 12 * MIB
    assert backup["chunks"] == 3
    # format 1: one object per chunk; format 3: their blocks in a pack or two (one per
    # packing thread), never an object per chunk of the index
    stored = len(data_objects(repo_dir))
    assert stored == 3 if repo_format(repo_dir) == 1 else 1 <= stored <= 2
    manifest = next((repo_dir / "manifests").iterdir())
    assert manifest.stat().st_size < 4096  # the index holds 3 entries, not 2**28
    point = str(backup["restore_point"])

    listed = _ok(cli, "list", *remote)["restore_points"]
    assert isinstance(listed, list) and len(listed) == 1
    assert listed[0]["size"] == PIB and listed[0]["data_bytes"] == 12 * MIB
    verified = _ok(cli, "verify", *remote)
    assert verified["ok"] is True and verified["chunks_checked"] == 3
    delta = _ok(cli, "backup", str(vm), *remote, "--mode", "delta")
    assert delta["bytes_read"] == 0  # unchanged: the sparse index is reused as it is

    target = tmp_path / "target"
    target.mkdir()
    restored = _ok(cli, "restore", point, *remote, "--to", str(target), "--name", "r1")
    image = Path(str(restored["location"])) / "d.qcow2"
    _check_image(image)

    # In place over a changed copy: data in a hole of the point is zeroed, the rest kept.
    _qemu_io(image, f"write -P 0x11 {PIB // 4} {MIB}", f"write -P 0x22 {MIB // 2} 4096")
    in_place = _ok(
        cli, "restore", point, *remote, "--to", str(image.parent), "--in-place", "--force"
    )
    assert 0 < int(str(in_place["bytes_written"])) <= 8 * MIB
    _qemu_io(image, f"read -P 0 {PIB // 4} {MIB}", f"read -P 0x5a 0 {MIB}")

    exported = tmp_path / "e.qcow2"
    _ok(cli, "export", point, "disk0", str(exported), "--format", "qcow2", *remote)
    _check_image(exported)
