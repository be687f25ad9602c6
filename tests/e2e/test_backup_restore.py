"""Backup and restore through the CLI, compared by hash with the disks at backup time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.stored_data import data_bytes

from .conftest import Cli, disk_hashes, sha256, vm_disks


def _points(cli: Cli, repo: Path) -> list[dict[str, object]]:
    return list(cli("list", "--remote", str(repo), "--json").json()["restore_points"])


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_full_then_deltas_each_point_restores_exactly(
    cli: Cli, make_vm: Callable[..., Path], any_repo: Path, tmp_path: Path, fmt: str
) -> None:
    """On repository formats 1 and 3 (any_repo)."""
    from vmkeep.connectors.files.demo import modify_demo_vm

    repo_dir = any_repo
    if fmt == "qcow2" and not shutil.which("qemu-img"):
        pytest.skip("qemu-img missing (Debian qemu-utils): cannot check qcow2 content")
    vm = make_vm(fmt=fmt)
    expected = {}
    full = cli("backup", str(vm), "--remote", str(repo_dir), "--mode", "full", "--json").json()
    expected[full["restore_point"]] = disk_hashes(vm)
    assert full["bytes_read"] > 0 and full["bytes_written"] > 0
    for seed in (1, 2):
        modify_demo_vm(vm, seed)
        delta = cli(
            "backup", str(vm), "--remote", str(repo_dir), "--mode", "delta", "--json"
        ).json()
        expected[delta["restore_point"]] = disk_hashes(vm)
        assert 1 <= delta["chunks_new"] <= 2  # the demo's change lands in one or two chunks
    assert len(set(map(str, expected.values()))) == 3  # each point saw a different disk
    source_uuid = json.loads((vm / "vm.json").read_text())["uuid"]
    for i, (point, hashes) in enumerate(expected.items()):
        out = cli(
            "restore",
            point,
            "--remote",
            str(repo_dir),
            "--to",
            str(tmp_path / "r"),
            "--name",
            f"copy{i}",
            "--json",
        ).json()
        restored = Path(out["location"])
        assert disk_hashes(restored) == hashes
        doc = json.loads((restored / "vm.json").read_text())
        assert doc["name"] == f"copy{i}" and doc["uuid"] != source_uuid
        assert [d["format"] for d in doc["disks"]] == [fmt]


def data_in_chunks(image: Path, chunks: list[int], chunk_size: int) -> int:
    """Allocated bytes of an image inside the given chunks (SEEK_DATA, as the backup reads)."""
    from vmkeep.connectors.files.raw import RawDiskReader

    reader = RawDiskReader(image)
    try:
        total = 0
        for e in reader.extents():
            for c in chunks if e.data else []:
                lo, hi = (
                    max(e.offset, c * chunk_size),
                    min(e.offset + e.length, (c + 1) * chunk_size),
                )
                total += max(0, hi - lo)
        return total
    finally:
        reader.close()


def test_delta_stores_only_changed_chunks(cli: Cli, repo_dir: Path, tmp_path: Path) -> None:
    from .test_faults import random_vm

    vm = random_vm(tmp_path, "data", 64 << 20, 9)
    full = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()
    with open(vm / "disk0.img", "r+b") as f:  # 3 scattered 64 KiB writes: 3 chunks change
        for offset in (0, 20 << 20, (40 << 20) + 12345):
            f.seek(offset)
            f.write(os.urandom(65536))
    delta = cli("backup", str(vm), "--remote", str(repo_dir), "--mode", "delta", "--json").json()
    assert full["chunks_new"] == full["chunks"] - full["bytes_zero"] // (4 << 20) > 10
    assert delta["chunks_new"] == 3 and delta["bytes_new"] == 3 * (4 << 20)
    # Image files have no dirty tracking: the delta reads all the disk's data extents (only
    # those, not the holes inside its chunks).
    assert delta["bytes_read"] == data_in_chunks(vm / "disk0.img", list(range(16)), 4 << 20)
    unchanged = cli(
        "backup", str(vm), "--remote", str(repo_dir), "--mode", "delta", "--json"
    ).json()
    assert unchanged["bytes_written"] == 0
    assert unchanged["bytes_read"] == 0 and "unchanged" in unchanged["notes"][0]
    with open(vm / "disk0.img", "r+b") as f:  # same bytes rewritten: the token changes
        head = f.read(4096)
        f.seek(0)
        f.write(head)
    reread = cli("backup", str(vm), "--remote", str(repo_dir), "--mode", "delta", "--json").json()
    assert reread["bytes_read"] > 0 and reread["bytes_written"] == 0
    full_again = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()
    assert full_again["bytes_read"] == reread["bytes_read"]  # full never trusts the token


def test_restored_raw_disk_stays_sparse(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    vm = make_vm(size=128 * 1024 * 1024)
    point = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    out = cli(
        "restore", point, "--remote", str(repo_dir), "--to", str(tmp_path / "r"), "--json"
    ).json()
    src = next(iter(vm_disks(vm).values()))
    dst = next(iter(vm_disks(Path(out["location"])).values()))
    assert sha256(src) == sha256(dst)
    allocated = os.stat(dst).st_blocks * 512
    assert allocated < os.stat(dst).st_size / 2
    assert allocated <= os.stat(src).st_blocks * 512 * 1.1 + 1024 * 1024


def test_dedup_across_vms(
    cli: Cli, make_vm: Callable[..., Path], any_repo: Path, tmp_path: Path
) -> None:
    repo_dir = any_repo
    vm = make_vm("a")
    twin = tmp_path / "vms" / "b"
    shutil.copytree(vm, twin)
    doc = json.loads((twin / "vm.json").read_text())
    doc.update(name="b", uuid="00000000-0000-4000-8000-00000000000b")
    (twin / "vm.json").write_text(json.dumps(doc))
    first = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()
    size_after_first = data_bytes(repo_dir)
    second = cli("backup", str(twin), "--remote", str(repo_dir), "--json").json()
    size_after_second = data_bytes(repo_dir)
    assert first["bytes_written"] > 1024 * 1024
    data = first["bytes_chunks"] - first["bytes_zero"]
    assert second["bytes_written"] == 0 and second["bytes_chunks"] - second["bytes_zero"] == data
    assert size_after_second == size_after_first


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_in_place_restore_writes_only_what_differs(
    cli: Cli, make_vm: Callable[..., Path], any_repo: Path, fmt: str
) -> None:
    """On repository formats 1 and 3 (any_repo)."""
    from vmkeep.connectors.files.demo import modify_demo_vm

    repo_dir = any_repo
    if fmt == "qcow2" and not shutil.which("qemu-img"):
        pytest.skip("qemu-img missing (Debian qemu-utils): cannot check qcow2 content")
    vm = make_vm(size=128 * 1024 * 1024, fmt=fmt)
    before = disk_hashes(vm)
    point = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    modify_demo_vm(vm, 7)
    assert disk_hashes(vm) != before
    out = cli(
        "restore", point, "--remote", str(repo_dir), "--to", str(vm), "--in-place", "--json"
    ).json()
    assert disk_hashes(vm) == before
    assert 0 < out["bytes_written"] <= 2 * (4 << 20) < out["bytes_restored"]
    again = cli(
        "restore", point, "--remote", str(repo_dir), "--to", str(vm), "--in-place", "--json"
    ).json()
    assert again["bytes_written"] == 0


def test_in_place_refuses_another_vm(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path
) -> None:
    a, b = make_vm("a"), make_vm("b")
    point = cli("backup", str(a), "--remote", str(repo_dir), "--json").json()["restore_point"]
    before = disk_hashes(b)
    run = cli("restore", point, "--remote", str(repo_dir), "--to", str(b), "--in-place", ok=False)
    assert "refusing" in run.err and disk_hashes(b) == before


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_export_is_usable_without_vmkeep(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path, fmt: str
) -> None:
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img missing (Debian qemu-utils): cannot check the exported image")
    vm = make_vm()
    ((name, src),) = vm_disks(vm).items()
    point = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    out = tmp_path / f"export.{fmt}"
    cli("export", point, name, str(out), "--format", fmt, "--remote", str(repo_dir))
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(out)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == fmt
    subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", str(out), str(src)], check=True)
    again = cli(
        "export", point, name, str(out), "--format", fmt, "--remote", str(repo_dir), ok=False
    )
    assert "exists" in again.err


def test_encrypted_repository_has_no_plaintext(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path
) -> None:
    vm = make_vm()
    (src,) = vm_disks(vm).values()
    from vmkeep.connectors.files.demo import DEMO_MARKER

    marker = DEMO_MARKER.encode()
    assert marker in src.read_bytes()  # the demo disk really holds it
    cli("backup", str(vm), "--remote", str(repo_dir))
    for path in repo_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert marker not in data and b"web01" not in data, path


def test_unencrypted_repository_round_trip(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    repo = tmp_path / "plain"
    cli("init", str(repo), "--encryption", "none")
    vm = make_vm()
    point = cli(
        "backup", str(vm), "--remote", str(repo), "--json", env={"VMKEEP_PASSPHRASE": ""}
    ).json()["restore_point"]
    out = cli("restore", point, "--remote", str(repo), "--to", str(tmp_path / "r"), "--json").json()
    assert disk_hashes(Path(out["location"])) == disk_hashes(vm)


def test_fresh_install_lists_and_restores(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    vm = make_vm()
    cli("remote", "add", "main", str(repo_dir))
    point = cli("backup", str(vm), "--json").json()["restore_point"]  # the only remote
    fresh = Cli(tmp_path / "another-machine")  # no configuration at all
    listed = fresh("list", "--remote", str(repo_dir), "--json").json()["restore_points"]
    assert [p["restore_point"] for p in listed] == [point]
    assert listed[0]["vm"] == "web01"
    out = fresh(
        "restore", point[:12], "--remote", str(repo_dir), "--to", str(tmp_path / "r"), "--json"
    ).json()
    assert disk_hashes(Path(out["location"])) == disk_hashes(vm)


def test_restore_next_to_the_original_picks_a_new_name(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    """Without --name, a restore into the directory that still holds the original VM becomes
    `<name>-restored-<point time>` (then -2): the original is never touched, no name needed."""
    vm = make_vm("web01")
    before = {p: sha256(p) for p in vm_disks(vm).values()}
    point = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()
    stamp = point["restore_point"].split(".")[0] + "Z"  # the point's time to the second
    args = ("restore", point["restore_point"], "--remote", str(repo_dir), "--to", str(vm.parent))
    first = cli(*args, "--json").json()
    second = cli(*args, "--json").json()
    assert Path(first["location"]).name == f"web01-restored-{stamp}"
    assert Path(second["location"]).name == f"web01-restored-{stamp}-2"
    for out in (first, second):
        assert out["vm"] == Path(out["location"]).name
        restored = sorted(sha256(p) for p in vm_disks(Path(out["location"])).values())
        assert restored == sorted(before.values())
    assert {p: sha256(p) for p in vm_disks(vm).values()} == before
    # An explicit --name that exists is still refused, not renamed.
    run = cli(*args, "--name", "web01", ok=False)
    assert "already exists" in run.err
