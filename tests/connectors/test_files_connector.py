"""FilesConnector end to end: listing, reading, creating VMs atomically (commit/abort),
restoring in place, and refusing hostile names from a backup's configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from files_support import run, sha256_file, sha256_reader, tool

from vmkeep.connectors.base import DiskInfo, VmConfig
from vmkeep.connectors.files import FilesConnector
from vmkeep.connectors.files.demo import create_demo_vm
from vmkeep.connectors.files.qcow2 import Qcow2Reader
from vmkeep.connectors.files.raw import RawDiskReader
from vmkeep.connectors.files.vmdir import LOCATION_KEY, load_vm_json
from vmkeep.errors import ConnectorError, NotFoundError, UsageError

MIB = 1 << 20


def _vm_json(vm_dir: Path, disks: list[dict[str, str]], name: str | None = None) -> None:
    vm_dir.mkdir(parents=True, exist_ok=True)
    doc = {"name": name or vm_dir.name, "uuid": str(uuid.uuid4()), "vcpus": 2,
           "memory_mib": 1024, "disks": disks, "metadata": {"owner": "tests"}}  # fmt: skip
    (vm_dir / "vm.json").write_text(json.dumps(doc))


def _plain_vm(root: Path, name: str, content: bytes = b"hello" * 1000) -> Path:
    vm_dir = root / name
    _vm_json(vm_dir, [{"name": "disk0", "file": "disk0.raw", "format": "raw"}])
    with (vm_dir / "disk0.raw").open("wb") as f:
        f.truncate(4 * MIB)
        f.write(content)
    return vm_dir


def test_list_and_get(tmp_path: Path) -> None:
    tool("mkfs.ext4")
    create_demo_vm(tmp_path, "alpha", disk_size=32 * MIB)
    create_demo_vm(tmp_path, "beta", disk_size=32 * MIB, fmt="qcow2")
    (tmp_path / "not-a-vm").mkdir()
    (tmp_path / ".vmkeep-new-hidden").mkdir()
    _vm_json(tmp_path / ".vmkeep-new-hidden", [])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "vm.json").write_text("{not json")
    connector = FilesConnector(tmp_path)
    vms = connector.list_vms()
    assert [vm.name for vm in vms] == ["alpha", "beta"]
    alpha, beta = vms
    assert alpha.memory == 512 * MIB and alpha.vcpus == 1
    assert beta.disks[0].format == "qcow2" and beta.disks[0].size == 32 * MIB
    assert connector.get_vm("alpha").uuid == alpha.uuid
    assert connector.get_vm(beta.uuid.upper()).name == "beta"
    assert connector.get_vm(str(tmp_path / "beta")).uuid == beta.uuid
    with pytest.raises(NotFoundError):
        connector.get_vm("gamma")
    with pytest.raises(ConnectorError, match="broken"):
        connector.get_vm(str(tmp_path / "broken"))
    _vm_json(tmp_path / "one", [], name="twin")
    _vm_json(tmp_path / "two", [], name="twin")
    with pytest.raises(UsageError, match="several"):
        connector.get_vm("twin")
    assert connector.get_vm("one").name == "twin"  # a directory name wins


def test_open_disk_reads_the_images(tmp_path: Path) -> None:
    tool("mkfs.ext4")
    connector = FilesConnector(tmp_path)
    for fmt in ("raw", "qcow2"):
        vm_dir = create_demo_vm(tmp_path, f"vm-{fmt}", disk_size=32 * MIB, fmt=fmt)
        vm = connector.get_vm(f"vm-{fmt}")
        reader = connector.open_disk(vm, vm.disks[0])
        assert isinstance(reader, Qcow2Reader if fmt == "qcow2" else RawDiskReader)
        expected = tmp_path / f"{fmt}.raw"
        run("qemu-img", "convert", "-f", fmt, "-O", "raw", vm_dir / f"disk0.{fmt}", expected)
        assert sha256_reader(reader) == sha256_file(expected)
        reader.close()
    with pytest.raises(NotFoundError):
        connector.open_disk(vm, DiskInfo(name="nope", size=1))


@pytest.mark.parametrize("kind", ["missing", "directory", "permission"])
def test_unreadable_image_is_one_line_naming_the_file(tmp_path: Path, kind: str) -> None:
    vm_dir = tmp_path / "vm"
    _vm_json(vm_dir, [{"name": "disk0", "file": "disk0.raw", "format": "raw"}])
    image = vm_dir / "disk0.raw"
    if kind == "directory":
        image.mkdir()
    if kind == "permission":
        image.write_bytes(b"x" * 4096)
        image.chmod(0)
        if os.geteuid() == 0:  # root reads anything: ask an unprivileged user instead
            _permission_as_nobody(tmp_path, image)
            return
    with pytest.raises(ConnectorError) as info:
        FilesConnector(tmp_path).get_vm("vm")
    message = str(info.value)
    assert str(image) in message and "\n" not in message


def _permission_as_nobody(tmp_path: Path, image: Path) -> None:
    tmp_path.chmod(0o755)
    image.parent.chmod(0o755)
    code = (
        "import sys\nfrom vmkeep.connectors.files.raw import RawDiskReader\n"
        "from vmkeep.errors import ConnectorError\n"
        "try:\n    RawDiskReader(sys.argv[1])\nexcept ConnectorError as e:\n    print(e)\n"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(image)], capture_output=True, text=True,
            user=65534, group=65534, env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
            check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run a test process as an unprivileged user: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"the unprivileged test process failed: {proc.stderr.strip()[-200:]}")
    assert proc.stdout.strip() == f"permission denied opening disk image {image}"


def _config(name: str, disks: list[DiskInfo]) -> VmConfig:
    metadata = {"note": "restored", LOCATION_KEY: "/elsewhere"}
    return VmConfig(
        name, str(uuid.uuid4()), vcpus=4, memory=3 * MIB + 1, disks=disks, metadata=metadata
    )


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_create_vm_commit(tmp_path: Path, fmt: str) -> None:
    target = tmp_path / "target"
    target.mkdir()
    disks = [DiskInfo("disk0", 8 * MIB, fmt, {"file": f"system.{fmt}"}), DiskInfo("data", MIB)]
    config = _config("restored", disks)
    sink = FilesConnector(tmp_path).create_vm(config, str(target))
    assert sink.location == str(target / "restored")
    writer = sink.open_disk(disks[0])
    writer.write(MIB, b"\xab" * MIB)
    writer.write(8 * MIB - 512, b"\xcd" * 512)
    writer.close()
    assert not (target / "restored").exists()  # nothing visible before commit
    (hidden,) = target.iterdir()
    assert hidden.name.startswith(".")
    sink.commit()  # "data" was never opened: it is still created, all zeros
    assert [p.name for p in target.iterdir()] == ["restored"]
    vm = FilesConnector(target).get_vm("restored")
    assert (vm.vcpus, vm.memory, vm.uuid) == (4, 4 * MIB, config.uuid)
    assert vm.metadata["note"] == "restored"
    assert vm.metadata[LOCATION_KEY] == str((target / "restored").resolve())
    doc = load_vm_json(target / "restored")
    assert [(d.name, d.file, d.format) for d in doc.disks] == [
        ("disk0", f"system.{fmt}", fmt),
        ("data", "data.raw", "raw"),
    ]
    reader = FilesConnector(target).open_disk(vm, vm.disks[0])
    assert next(e.offset for e in reader.extents() if e.data) == MIB
    assert reader.read(MIB - 1, 2) == b"\x00\xab"
    assert reader.read(8 * MIB - 512, 1024) == b"\xcd" * 512
    reader.close()
    if fmt == "qcow2":
        assert "No errors" in run("qemu-img", "check", target / "restored" / "system.qcow2")


def test_create_vm_abort_and_existing_name(tmp_path: Path) -> None:
    connector = FilesConnector(tmp_path)
    disk = DiskInfo("disk0", MIB)
    sink = connector.create_vm(_config("gone", [disk]), str(tmp_path))
    sink.open_disk(disk).write(0, b"x")
    sink.abort()
    sink.abort()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConnectorError, match="already exists"):
        connector.create_vm(_config("taken", [disk]), str(tmp_path))
    sink = connector.create_vm(_config("late", [disk]), str(tmp_path))
    (tmp_path / "late").mkdir()  # appears while the restore runs
    with pytest.raises(ConnectorError, match="already exists"):
        sink.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", "taken"]
    assert list((tmp_path / "late").iterdir()) == []
    with pytest.raises(ConnectorError, match="not a directory"):
        connector.create_vm(_config("x", [disk]), str(tmp_path / "missing"))


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", ""])
def test_create_vm_refuses_unsafe_vm_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConnectorError):
        FilesConnector(tmp_path).create_vm(_config(name, []), str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_hostile_disk_file_names_stay_inside(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    hostile = ["../../escape.raw", "/etc/passwd", "a/b/c.raw", "..", "vm.json", "", ".bashrc",
               "x\\..\\..\\y", "same.raw", "same.raw", "ok.qcow2\n"]  # fmt: skip
    disks = [DiskInfo(f"d{i}", 4096, "raw", {"file": f}) for i, f in enumerate(hostile)]
    disks.append(DiskInfo("../d-name", 4096, "raw", {"file": 42}))
    sink = FilesConnector(tmp_path).create_vm(_config("vm", disks), str(target))
    for disk in disks:
        sink.open_disk(disk).write(0, b"data")
    sink.commit()
    vm_dir = target / "vm"
    files = sorted(p.name for p in vm_dir.iterdir())
    assert all(p.is_file() for p in vm_dir.iterdir())
    assert len(files) == len(disks) + 1 and "vm.json" in files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    assert [p.name for p in target.iterdir()] == ["vm"]
    doc = load_vm_json(vm_dir)
    assert all("/" not in d.file and not d.file.startswith(".") for d in doc.disks)
    assert len({d.file for d in doc.disks}) == len(disks)


@pytest.mark.parametrize("bad", ["../outside.raw", "/etc/passwd", "a/../../b", "vm.json"])
def test_hostile_vm_json_is_refused(tmp_path: Path, bad: str) -> None:
    _vm_json(tmp_path / "vm", [{"name": "disk0", "file": bad, "format": "raw"}])
    with pytest.raises(ConnectorError, match=r"disks\.0\.file"):
        FilesConnector(tmp_path).get_vm("vm")


def test_overwrite_raw_in_place(tmp_path: Path) -> None:
    vm_dir = _plain_vm(tmp_path, "vm")
    connector = FilesConnector(tmp_path)
    vm = connector.get_vm("vm")
    vm.vcpus = 8
    sink = connector.overwrite_vm(vm)
    writer = sink.open_disk(vm.disks[0])
    writer.write(MIB, b"\x01" * 4096)
    writer.zero(0, 4096)
    sink.commit()
    data = (vm_dir / "disk0.raw").read_bytes()
    assert data[:4096] == bytes(4096)
    assert data[4096:5000] == (b"hello" * 1000)[4096:5000]
    assert data[MIB : MIB + 4096] == b"\x01" * 4096
    assert connector.get_vm("vm").vcpus == 8
    assert "vmkeep.files.location" not in (vm_dir / "vm.json").read_text()


def test_overwrite_qcow2_keeps_unwritten_data_and_abort_keeps_original(tmp_path: Path) -> None:
    tool("qemu-io")
    vm_dir = tmp_path / "vm"
    _vm_json(vm_dir, [{"name": "disk0", "file": "disks/d.qcow2", "format": "qcow2"}])
    (vm_dir / "disks").mkdir()
    image = vm_dir / "disks" / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", "-c", "write -P 0x22 8M 1M", image)
    image.chmod(0o640)
    before = sha256_file(image)
    connector = FilesConnector(tmp_path)
    vm = connector.get_vm("vm")

    sink = connector.overwrite_vm(vm)
    sink.open_disk(vm.disks[0]).write(0, b"\x33" * MIB)
    sink.abort()
    assert sha256_file(image) == before
    assert sorted(p.name for p in image.parent.iterdir()) == ["d.qcow2"]

    sink = connector.overwrite_vm(vm)
    writer = sink.open_disk(vm.disks[0])
    writer.write(MIB, b"\x44" * MIB)
    writer.zero(8 * MIB, MIB)
    sink.commit()
    assert "No errors" in run("qemu-img", "check", image)
    assert image.stat().st_mode & 0o777 == 0o640
    reader = Qcow2Reader(image)
    assert reader.read(0, 4 * MIB) == b"\x11" * MIB + b"\x44" * MIB + b"\x11" * 2 * MIB
    assert reader.read(8 * MIB, MIB) == bytes(MIB)
    reader.close()
    assert sorted(p.name for p in image.parent.iterdir()) == ["d.qcow2"]


def test_overwrite_adds_a_missing_disk(tmp_path: Path) -> None:
    vm_dir = _plain_vm(tmp_path, "vm")
    connector = FilesConnector(tmp_path)
    vm = connector.get_vm("vm")
    extra = DiskInfo("disk1", MIB, "qcow2", {"file": "../../new.qcow2"})
    sink = connector.overwrite_vm(vm)
    sink.open_disk(extra).write(0, b"new")
    sink.commit()
    doc = load_vm_json(vm_dir)
    assert [(d.name, d.file) for d in doc.disks] == [("disk0", "disk0.raw"), ("disk1", "new.qcow2")]
    assert not (tmp_path.parent / "new.qcow2").exists()


def test_overwrite_never_targets_another_vm_at_the_recorded_place(tmp_path: Path) -> None:
    _plain_vm(tmp_path, "vm")
    connector = FilesConnector(tmp_path)
    stale = connector.get_vm("vm")
    stale.uuid = str(uuid.uuid4())  # as if the VM there had been replaced by another one
    with pytest.raises(NotFoundError):
        connector.overwrite_vm(stale)
