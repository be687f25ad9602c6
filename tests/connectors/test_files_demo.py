"""The demo VM: a real MBR and ext4 (checked by sfdisk, e2fsck and debugfs), sparse, and a
deterministic ~1% change for the second backup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from files_support import run, tool

from vmkeep.connectors.files.demo import (
    DEMO_MARKER,
    NOTES_PATH,
    PARTITION_START,
    create_demo_vm,
    modify_demo_vm,
)
from vmkeep.connectors.files.images import open_reader
from vmkeep.connectors.files.raw import RawDiskWriter
from vmkeep.connectors.files.vmdir import load_vm_json
from vmkeep.errors import ConnectorError, UsageError

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    for name in ("mkfs.ext4", "debugfs", "e2fsck", "sfdisk"):
        tool(name)


def _disk(vm_dir: Path) -> tuple[Path, str]:
    entry = load_vm_json(vm_dir).disks[0]
    return vm_dir / entry.file, entry.format


def _as_raw(vm_dir: Path, out: Path) -> Path:
    """The disk as a sparse raw file, read through our own reader."""
    path, fmt = _disk(vm_dir)
    reader = open_reader(path, fmt)
    writer = RawDiskWriter(out, reader.size)
    for extent in reader.extents():
        if extent.data:
            writer.write(extent.offset, reader.read(extent.offset, extent.length))
    writer.close()
    reader.close()
    return out


def _partition(raw: Path, out: Path) -> Path:
    reader = open_reader(raw, "raw")
    writer = RawDiskWriter(out, reader.size - PARTITION_START)
    for extent in reader.extents():
        if extent.data and extent.offset >= PARTITION_START:
            data = reader.read(extent.offset, extent.length)
            writer.write(extent.offset - PARTITION_START, data)
    writer.close()
    reader.close()
    return out


def _snapshot(vm_dir: Path) -> tuple[bytes, dict[int, bytes], int]:
    """Sector 0, the content of every allocated 4 KiB block, and the allocated byte count."""
    path, fmt = _disk(vm_dir)
    reader = open_reader(path, fmt)
    blocks: dict[int, bytes] = {}
    allocated = 0
    for extent in reader.extents():
        if extent.data:
            allocated += extent.length
            data = reader.read(extent.offset, extent.length)
            for i in range(0, len(data), 4096):
                blocks[extent.offset + i] = data[i : i + 4096]
    sector0 = reader.read(0, 512)
    reader.close()
    return sector0, blocks, allocated


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_demo_disk_has_partition_and_file_system(tmp_path: Path, fmt: str) -> None:
    vm_dir = create_demo_vm(tmp_path, f"demo-{fmt}", disk_size=64 * MIB, fmt=fmt)
    assert vm_dir == tmp_path / f"demo-{fmt}"
    assert [p.name for p in tmp_path.iterdir()] == [vm_dir.name]  # no temp leftovers
    path, disk_fmt = _disk(vm_dir)
    assert disk_fmt == fmt
    if fmt == "qcow2":
        assert "No errors" in run("qemu-img", "check", path)
    raw = _as_raw(vm_dir, tmp_path / "disk.raw")
    table = json.loads(run("sfdisk", "--json", raw))["partitiontable"]
    assert table["label"] == "dos"
    (part,) = table["partitions"]
    assert part["start"] == PARTITION_START // 512 and part["type"] == "83"
    assert (part["start"] + part["size"]) * 512 == 64 * MIB
    fs = _partition(raw, tmp_path / "part.img")
    run("e2fsck", "-fn", fs)
    notes = run("debugfs", "-R", f"cat {NOTES_PATH}", f"{raw}?offset={PARTITION_START}")
    assert DEMO_MARKER in notes
    assert run("debugfs", "-R", "cat /etc/hostname", fs).strip() == f"demo-{fmt}"


def test_demo_disk_is_sparse(tmp_path: Path) -> None:
    vm_dir = create_demo_vm(tmp_path, "sparse")  # default 256 MiB, raw
    path, _ = _disk(vm_dir)
    assert path.stat().st_size == 256 * MIB
    assert path.stat().st_blocks * 512 < 16 * MIB
    reader = open_reader(path, "raw")
    allocated = sum(e.length for e in reader.extents() if e.data)
    assert 3 * MIB < allocated < 16 * MIB  # the random data is there, and little else
    reader.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_modify_changes_about_one_percent(tmp_path: Path, fmt: str) -> None:
    vm_dir = create_demo_vm(tmp_path, "mod", disk_size=64 * MIB, fmt=fmt)
    sector0, before, allocated = _snapshot(vm_dir)
    changed = modify_demo_vm(vm_dir, seed=42)
    sector0_after, after, allocated_after = _snapshot(vm_dir)
    assert sector0_after == sector0 and allocated_after == allocated
    differing = [off for off, data in before.items() if after[off] != data]
    assert len(differing) * 4096 == changed
    assert 0.005 * allocated <= changed <= 0.02 * allocated
    raw = _as_raw(vm_dir, tmp_path / "disk.raw")
    run("e2fsck", "-fn", _partition(raw, tmp_path / "part.img"))  # still consistent
    if fmt == "qcow2":
        assert "No errors" in run("qemu-img", "check", _disk(vm_dir)[0])


def test_modify_is_deterministic(tmp_path: Path) -> None:
    changed_blocks = []
    for parent in ("a", "b"):
        (tmp_path / parent).mkdir()
        vm_dir = create_demo_vm(tmp_path / parent, "same", disk_size=64 * MIB)
        _, before, _ = _snapshot(vm_dir)
        modify_demo_vm(vm_dir, seed=7)
        _, after, _ = _snapshot(vm_dir)
        changed_blocks.append(
            {off: after[off] for off, data in before.items() if after[off] != data}
        )
    assert changed_blocks[0] == changed_blocks[1]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        create_demo_vm(tmp_path, "x", fmt="vmdk")
    with pytest.raises(UsageError):
        create_demo_vm(tmp_path, "x", disk_size=MIB)
    with pytest.raises(ConnectorError):
        create_demo_vm(tmp_path, "../escape")
    create_demo_vm(tmp_path, "twice", disk_size=32 * MIB)
    with pytest.raises(ConnectorError, match="already exists"):
        create_demo_vm(tmp_path, "twice", disk_size=32 * MIB)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "vm.json").write_text(
        '{"name": "plain", "uuid": "6f1c3c9e-1d7a-4e55-9d53-5d8c1b1f6a11", "vcpus": 1, '
        '"memory_mib": 64, "disks": []}'
    )
    with pytest.raises(ConnectorError, match="not a demo VM"):
        modify_demo_vm(tmp_path / "plain", 1)
