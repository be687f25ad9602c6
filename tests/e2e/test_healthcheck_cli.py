"""`vmkeep healthcheck` with the files kind: a real point restores into a scratch directory and
reads back against its chunk IDs; a chunk corrupted on the remote fails it naming the disk; a
restored disk that differs from its chunks is caught at the right offset; scratch copies are
removed afterwards, and a killed check's leftovers by the next one."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vmkeep.connectors.base import DiskInfo
from vmkeep.connectors.files import FilesConnector
from vmkeep.operations import healthcheck
from vmkeep.operations.healthcheck import (
    clean_stale_scratch,
    make_scratch,
    read_back,
    remove_scratch,
)
from vmkeep.operations.healthcheck_model import HealthResult
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import ZERO_ID
from vmkeep.repository.manifest import Manifest
from vmkeep.repository.repository import Repository

from .conftest import PASSPHRASE, Cli

MiB = 1 << 20
DISK1 = 12 * MiB  # three 4 MiB chunks: random, zeros, random


def two_disk_vm(make_vm: Callable[..., Path]) -> Path:
    """A demo VM (ext4 on disk0) plus disk1 of random data with a zero chunk in the middle."""
    vm = make_vm(size=32 * MiB)
    with (vm / "disk1.raw").open("wb") as f:
        f.write(os.urandom(4 * MiB))
        f.seek(8 * MiB)
        f.write(os.urandom(4 * MiB))
    doc = json.loads((vm / "vm.json").read_text())
    doc["disks"].append({"name": "disk1", "file": "disk1.raw", "format": "raw"})
    (vm / "vm.json").write_text(json.dumps(doc))
    return vm


def open_repo(path: Path) -> Repository:
    return Repository.open(LocalRemote(path), lambda confirm=False: PASSPHRASE.encode())


def manifest_of(repo_dir: Path, point: str) -> Manifest:
    return open_repo(repo_dir).load_manifest(point)


def backed_up(cli: Cli, make_vm: Callable[..., Path], repo_dir: Path) -> str:
    vm = two_disk_vm(make_vm)
    run = cli("backup", str(vm), "--remote", str(repo_dir), "--json")
    return str(run.json()["restore_point"])


def test_healthy_point_reads_back_ok_and_scratch_is_removed(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    point = backed_up(cli, make_vm, repo_dir)
    scratch = tmp_path / "scratch"
    run = cli("healthcheck", point, "--remote", str(repo_dir), "--scratch", str(scratch), "--json")
    result = run.json()
    assert result["status"] == "ok" and result["ok"] is True, result
    assert result["kind"] == "files" and result["restore_point"] == point
    # every chunk of both disks was read back: 32 MiB / 4 MiB + 12 MiB / 4 MiB
    assert result["chunks_checked"] == 8 + 3
    assert result["bytes_checked"] == 32 * MiB + DISK1
    assert {"restore", "read_back", "cleanup", "total"} <= set(result["durations"])
    assert list(scratch.iterdir()) == []  # the scratch copy is gone


def test_default_scratch_is_the_temp_dir_and_is_cleaned(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    point = backed_up(cli, make_vm, repo_dir)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    run = cli("healthcheck", point, "--remote", str(repo_dir), env={"TMPDIR": str(tmp)})
    assert "health check (files)" in run.err and "ok" in run.err
    assert list(tmp.iterdir()) == []


def test_chunk_corrupted_on_the_remote_fails_naming_the_disk(
    cli: Cli, make_vm: Callable[..., Path], chunk_repo: Path, tmp_path: Path
) -> None:
    repo_dir = chunk_repo  # a chunk object found by its ID (format 1)
    point = backed_up(cli, make_vm, repo_dir)
    manifest = manifest_of(repo_dir, point)
    disks = {d.name: d for d in manifest.disks}
    only_disk1 = disks["disk1"].stored_ids() - disks["disk0"].stored_ids()
    victim = repo_dir / "chunks" / sorted(only_disk1)[0].hex()[:2] / sorted(only_disk1)[0].hex()
    if not victim.exists():  # layout: find it by name wherever it is
        victim = next(p for p in (repo_dir / "chunks").rglob(sorted(only_disk1)[0].hex()))
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    victim.write_bytes(bytes(blob))
    scratch = tmp_path / "scratch"
    args = ("healthcheck", point, "--remote", str(repo_dir), "--scratch", str(scratch))
    run = cli(*args, "--json", ok=False)
    assert run.code == 3  # corruption found
    result = run.json()
    assert result["status"] == "failed" and result["corrupt"] is True
    assert result["disk"] == "disk1", result
    assert "corrupt" in result["reason"]
    assert list(scratch.iterdir()) == []
    plain = cli(*args, ok=False)
    assert "disk1" in plain.err.strip().splitlines()[-1]


@pytest.mark.parametrize("where", ["data", "zero"])
def test_read_back_finds_the_first_bad_offset(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path, where: str
) -> None:
    """The comparison itself: a restored disk changed in one chunk (a data chunk, or the
    all-zero chunk, which is not stored and must read as zeros) fails at that chunk's start."""
    point = backed_up(cli, make_vm, repo_dir)
    repo = open_repo(repo_dir)
    manifest = repo.load_manifest(point)
    index = next(d for d in manifest.disks if d.name == "disk1")
    assert index.chunk_id(1) == ZERO_ID and index.chunk_id(2) != ZERO_ID
    out = tmp_path / "restored"
    out.mkdir()
    files = FilesConnector(out)
    report = restore_vm(repo, files, point, str(out), SilentProgress(), name="vm")
    chunk = 1 if where == "zero" else 2
    with (Path(report.location) / "disk1.raw").open("r+b") as f:
        f.seek(chunk * 4 * MiB + 12345)
        f.write(b"\x01")
    vm = files.get_vm(report.location)
    result = HealthResult(point, "web01", "files")
    reader = files.open_disk(vm, DiskInfo("disk1", DISK1))
    try:
        read_back(repo, index, reader, result, SilentProgress(), "web01")
    finally:
        reader.close()
    assert not result.ok and result.corrupt
    assert (result.disk, result.offset) == ("disk1", chunk * 4 * MiB)
    assert result.chunks_checked == 3
    # and the untouched disk reads back clean
    ok = HealthResult(point, "web01", "files")
    index0 = next(d for d in manifest.disks if d.name == "disk0")
    reader = files.open_disk(vm, DiskInfo("disk0", index0.size))
    try:
        read_back(repo, index0, reader, ok, SilentProgress(), "web01")
    finally:
        reader.close()
    assert ok.ok, ok.reason


def test_a_killed_checks_scratch_is_removed_a_running_ones_is_not(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    point = backed_up(cli, make_vm, repo_dir)
    scratch = tmp_path / "scratch"
    stale = scratch / "vmkeep-hc-killed"
    (stale / "vm").mkdir(parents=True)
    (stale / ".lock").touch()
    (stale / "vm" / "disk0.raw").write_bytes(b"x" * 4096)
    running = scratch / "vmkeep-hc-running"
    running.mkdir()
    with (running / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        run = cli(
            "healthcheck", point, "--remote", str(repo_dir), "--scratch", str(scratch), "--json"
        )
    result = run.json()
    assert result["ok"] is True
    assert any("vmkeep-hc-killed" in n for n in result["notes"]), result["notes"]
    assert sorted(p.name for p in scratch.iterdir()) == ["vmkeep-hc-running"]


def test_a_check_starting_beside_another_never_removes_its_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two checks at once (a job checks its VMs in parallel): the second one's clean-up runs
    at the worst moment of the first one's start, between the lock file's creation and its
    flock. The first one's directory must stay (the lock file appears already locked); with a
    lock file created first and flocked after, the clean-up removed it and the check failed
    with "restore target ... is not a directory" (seen in CI under load)."""
    real_flock = fcntl.flock
    starting = True

    def flock_after_a_cleanup(fd: object, op: int) -> None:
        nonlocal starting
        if starting:  # the first call is make_scratch's own: another check cleans up now
            starting = False
            clean_stale_scratch(tmp_path)
        real_flock(fd, op)  # type: ignore[arg-type]

    monkeypatch.setattr(healthcheck.fcntl, "flock", flock_after_a_cleanup)
    workdir, lock = make_scratch(tmp_path)
    try:
        assert workdir.is_dir() and (workdir / ".lock").is_file()
        monkeypatch.setattr(healthcheck.fcntl, "flock", real_flock)
        assert clean_stale_scratch(tmp_path) == []  # held: a check in progress
        assert workdir.is_dir()
    finally:
        remove_scratch(workdir, lock)
    assert not workdir.exists()


def test_bad_input_is_one_line(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    point = backed_up(cli, make_vm, repo_dir)
    run = cli("healthcheck", "ffffffff", "--remote", str(repo_dir), ok=False)
    assert run.code not in (0, 70)
    not_dir = tmp_path / "file"
    not_dir.write_text("")
    run = cli("healthcheck", point, "--remote", str(repo_dir), "--scratch", str(not_dir), ok=False)
    assert "--scratch" in run.err and run.code == 2
    run = cli("healthcheck", point, "--remote", str(repo_dir), "--connector", "xen", ok=False)
    assert "xen" in run.err and run.code == 2
    run = cli("healthcheck", point, "--remote", str(repo_dir), "--timeout", "0", ok=False)
    assert "--timeout" in run.err and run.code == 2
