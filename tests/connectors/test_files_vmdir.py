"""vm.json: validation, atomic save, and the mapping to and from VmConfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmkeep.connectors.base import DiskInfo, VmConfig
from vmkeep.connectors.files.vmdir import (
    LOCATION_KEY,
    DiskEntry,
    from_vm_config,
    load_vm_json,
    safe_disk_filename,
    save_vm_json,
    to_vm_config,
)
from vmkeep.errors import ConnectorError, NotFoundError

UUID = "6F1C3C9E-1D7A-4E55-9D53-5D8C1B1F6A11"
GOOD = {
    "name": "web",
    "uuid": UUID,
    "vcpus": 2,
    "memory_mib": 2048,
    "disks": [{"name": "vda", "file": "disks/vda.qcow2", "format": "qcow2"}],
    "metadata": {"tags": ["prod"], "nested": {"a": 1}},
}


def _write(vm_dir: Path, doc: object) -> None:
    vm_dir.mkdir(exist_ok=True)
    (vm_dir / "vm.json").write_text(json.dumps(doc))


def test_round_trip_through_vm_config(tmp_path: Path) -> None:
    _write(tmp_path, GOOD)
    doc = load_vm_json(tmp_path)
    assert doc.uuid == UUID.lower()
    config = to_vm_config(doc, tmp_path, {"vda": 10 << 30})
    assert config.memory == 2048 << 20
    assert config.disks == [DiskInfo("vda", 10 << 30, "qcow2", {"file": "disks/vda.qcow2"})]
    assert config.metadata[LOCATION_KEY] == str(tmp_path.resolve())
    back = from_vm_config(config, doc.disks)
    assert back == doc  # our own location key is not written back
    save_vm_json(tmp_path, back)
    assert load_vm_json(tmp_path) == doc
    assert [p.name for p in tmp_path.iterdir()] == ["vm.json"]  # no temp file left


def test_memory_is_rounded_up_to_whole_mib() -> None:
    config = VmConfig("x", UUID, 1, (1 << 20) + 1, [])
    assert from_vm_config(config, []).memory_mib == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"uuid": "not-a-uuid"}, "uuid"),
        ({"vcpus": 0}, "vcpus"),
        ({"colour": "blue"}, "colour"),
        ({"disks": [{"name": "a", "file": "/abs"}]}, r"disks\.0\.file"),
        ({"disks": [{"name": "a", "file": "x/../../y"}]}, r"disks\.0\.file"),
        ({"disks": [{"name": "a", "file": "a.raw", "format": "vmdk"}]}, "format"),
        ({"disks": [{"name": "a", "file": "a"}, {"name": "a", "file": "b"}]}, "unique"),
        ({"disks": [{"name": "a", "file": "a"}, {"name": "b", "file": "a"}]}, "same file"),
    ],
)
def test_invalid_documents(tmp_path: Path, change: dict[str, object], message: str) -> None:
    _write(tmp_path, {**GOOD, **change})
    with pytest.raises(ConnectorError, match=message) as info:
        load_vm_json(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_and_unparsable(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        load_vm_json(tmp_path)
    (tmp_path / "vm.json").write_text("[1, 2")
    with pytest.raises(ConnectorError, match="not JSON"):
        load_vm_json(tmp_path)
    (tmp_path / "vm.json").write_text("[1, 2]")
    with pytest.raises(ConnectorError):
        load_vm_json(tmp_path)


def test_safe_disk_filename() -> None:
    taken: set[str] = set()
    names = [
        safe_disk_filename(DiskInfo("vda", 1, "qcow2", {"file": f}), taken)
        for f in ["disk.qcow2", "disk.qcow2", "../../etc/passwd", "vm.json", "...", "a b/c d"]
    ]
    assert names == ["disk.qcow2", "disk-1.qcow2", "passwd", "vda.qcow2", "vda-1.qcow2", "c_d"]
    assert all(DiskEntry(name="x", file=n).file == n for n in names)
