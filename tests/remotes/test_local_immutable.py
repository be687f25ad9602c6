"""Immutable local repositories for real: vmkeep writes retention records, the root-run
`vmkeep-immutable apply` sets `chattr +i` (a plain `rm` then fails), prune and gc keep what is
locked and say until when, and once the retention ended the attribute is lifted and space freed.
Every test lifts the attribute from everything it made, whatever happens."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.immutable_files import lift_all
from vmkeep.connectors.files import FilesConnector
from vmkeep.connectors.files.demo import create_demo_vm, modify_demo_vm
from vmkeep.errors import ObjectLockedError
from vmkeep.operations.backup import BackupOptions, BackupReport, backup_vm
from vmkeep.operations.prune import apply_prune
from vmkeep.operations.remote_probe import probe_remote
from vmkeep.operations.restore import restore_vm
from vmkeep.operations.retention import PointRef, RetentionPolicy, prune_plan
from vmkeep.progress import SilentProgress
from vmkeep.remotes.file_attributes import is_immutable, set_immutable
from vmkeep.remotes.immutable_apply import apply_records
from vmkeep.remotes.local import LocalRemote
from vmkeep.remotes.object_lock import LockPolicy
from vmkeep.remotes.retention_records import decode_record, record_name
from vmkeep.repository.format import chunk_object_name, manifest_object_name
from vmkeep.repository.gc import collect_garbage
from vmkeep.repository.repository import Repository

HELPER = str(Path(sys.executable).with_name("vmkeep-immutable"))
PASS = b"immutable local passphrase"


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("setting the immutable attribute needs root (CAP_LINUX_IMMUTABLE)")
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        set_immutable(fd, True)
        set_immutable(fd, False)
    except OSError as exc:
        pytest.skip(f"no immutable attribute here: {exc}")
    finally:
        os.close(fd)
    try:
        yield tmp_path
    finally:
        lift_all(tmp_path)


def helper(repo: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [HELPER, "apply", str(repo), "--json"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)[str(repo)]
    return report


def disk_hash(vm_dir: Path) -> str:
    disk = json.loads((vm_dir / "vm.json").read_text())["disks"][0]["file"]
    return hashlib.sha256((vm_dir / disk).read_bytes()).hexdigest()


def make_repo(workdir: Path, seconds: int) -> Repository:
    remote = LocalRemote(workdir / "repo")
    # format 1: these tests name chunk objects (format 3: the last test)
    repo = Repository.init(remote, "aes-256-gcm", lambda: PASS, format_version=1)
    remote.set_lock_policy(LockPolicy(seconds=seconds))
    return repo


def backup(repo: Repository, vm: Path, mode: str = "full") -> BackupReport:
    return backup_vm(repo, FilesConnector(), str(vm), BackupOptions(mode=mode), SilentProgress())


def demo_vm(workdir: Path) -> Path:
    (workdir / "vms").mkdir(exist_ok=True)
    return create_demo_vm(workdir / "vms", "imm", 32 * 1024 * 1024)


def test_records_made_immutable_by_the_helper_refuse_rm_and_prune(workdir: Path) -> None:
    repo = make_repo(workdir, seconds=3600)
    root = workdir / "repo"
    vm = demo_vm(workdir)
    first_hash = disk_hash(vm)
    first = backup(repo, vm)
    modify_demo_vm(vm, 3)
    second = backup(repo, vm, "delta")
    record = decode_record(
        first.restore_point, (root / record_name(first.restore_point)).read_bytes()
    )
    assert record is not None
    chunks = {
        chunk_object_name(c) for c in repo.load_manifest(first.restore_point).referenced_ids()
    }
    assert set(record.objects) == chunks | {manifest_object_name(first.restore_point), "config"}
    assert not is_immutable(root / manifest_object_name(first.restore_point))  # helper not run

    report = helper(root)
    assert report["records"] == 2 and report["unlocked"] == 0
    every = set(record.objects) | {record.name}
    assert all(is_immutable(root / n) for n in every)
    second_record = decode_record(
        second.restore_point, (root / record_name(second.restore_point)).read_bytes()
    )
    assert second_record is not None
    protected = every | set(second_record.objects) | {second_record.name}
    assert report["locked"] == len(protected)  # each object once, however many records name it
    victim = root / sorted(chunks)[0]
    rm = subprocess.run(["rm", "-f", str(victim)], capture_output=True, text=True)
    assert rm.returncode != 0 and "Operation not permitted" in rm.stderr
    assert victim.exists()
    with pytest.raises(ObjectLockedError):
        repo.remote.put(sorted(chunks)[0], b"overwritten")
    # The wrapped keys are protected too: deleting config would make every point unreadable.
    assert is_immutable(root / "config")
    with pytest.raises(ObjectLockedError, match="immutable"):
        repo.add_key(b"another passphrase", "ransom")

    manifests, _ = repo.load_manifests()
    plan = prune_plan(
        [PointRef(m.id, m.vm_uuid, m.schedule, m.created) for m in manifests],
        RetentionPolicy(keep_last=1),
    )
    result = apply_prune(repo, plan, dry_run=False)
    assert result.removed == [] and result.locked == {first.restore_point: record.until}
    assert repo.point_ids() == sorted([first.restore_point, second.restore_point])
    (workdir / "r").mkdir()
    out = restore_vm(
        repo, FilesConnector(), first.restore_point, str(workdir / "r"), SilentProgress()
    )
    assert disk_hash(Path(out.location)) == first_hash


def test_gc_keeps_immutable_garbage_of_a_killed_backup(workdir: Path) -> None:
    repo = make_repo(workdir, seconds=3600)
    root = workdir / "repo"
    orphan = b"chunk of a backup killed between its retention record and its manifest"
    chunk_id = repo.chunk_id(orphan)
    repo.put_chunk(chunk_id, orphan, 3)
    until = datetime.now(UTC) + timedelta(hours=1)
    point = "20990101T000000Z-dead00"
    LocalRemote(root).protect_point(
        point, [chunk_object_name(chunk_id)], [manifest_object_name(point)], until
    )
    helper(root)
    report = collect_garbage(repo, SilentProgress())
    assert (report.chunks_deleted, report.locked.count) == (0, 1)
    assert report.locked.first_unlock == until.replace(microsecond=until.microsecond)
    assert (root / chunk_object_name(chunk_id)).exists()


def test_expired_retention_is_lifted_and_gc_frees_it(workdir: Path) -> None:
    repo = make_repo(workdir, seconds=8)
    root = workdir / "repo"
    vm = demo_vm(workdir)
    first = backup(repo, vm)
    modify_demo_vm(vm, 5)
    second = backup(repo, vm, "delta")
    helper(root)
    with pytest.raises(ObjectLockedError):  # still inside its 8 s (the helper ran at once)
        repo.delete_manifest(first.restore_point)
    ends = LocalRemote(root).lock_ends()
    time.sleep(max(0.0, (max(ends.values()) - datetime.now(UTC)).total_seconds()) + 0.5)
    report = helper(root)
    assert report["locked"] == 0 and report["unlocked"] > 0
    assert not any(is_immutable(p) for p in root.rglob("*") if p.is_file())
    repo.delete_manifest(first.restore_point)
    gc = collect_garbage(repo, SilentProgress())
    assert gc.chunks_deleted >= 1 and gc.locked.count == 0
    assert gc.retention_records_removed == 2  # both expired: they protect nothing any more
    assert repo.point_ids() == [second.restore_point]
    assert list(repo.remote.list("retention/")) == []


def test_the_helper_never_follows_links_or_touches_foreign_files(workdir: Path) -> None:
    make_repo(workdir, seconds=3600)
    root = workdir / "repo"
    outside = workdir / "precious"
    outside.write_bytes(b"not part of the repository")
    (root / "chunks" / "aa").mkdir(parents=True)
    link = "chunks/aa/" + "aa" * 32
    os.symlink(outside, root / link)
    foreign = root / "chunks" / "aa" / ("ab" * 32)
    foreign.write_bytes(b"x")
    os.chown(foreign, 65534, 65534)
    until = datetime.now(UTC) + timedelta(hours=1)
    names = [link, "chunks/aa/" + "ab" * 32]
    LocalRemote(root).protect_point("20990101T000000Z-evil00", names, [], until)
    report = apply_records(root)
    assert sorted(report.skipped) == sorted(names)
    assert not is_immutable(outside) and not is_immutable(foreign)


def test_remote_test_reports_a_helper_that_did_not_run(workdir: Path) -> None:
    repo = make_repo(workdir, seconds=3600)
    root = workdir / "repo"
    backup(repo, demo_vm(workdir))
    remote = LocalRemote(root)
    before = probe_remote(remote, 4 * 1024 * 1024)
    assert before.immutable is True and not before.ok
    assert "vmkeep-immutable apply" in before.checks["immutable: delete/overwrite refused"]
    helper(root)
    after = probe_remote(remote, 4 * 1024 * 1024)
    assert after.ok and after.checks["immutable: delete/overwrite refused"] == "ok"


def test_the_helper_without_the_capability_fails_in_one_line(workdir: Path) -> None:
    """Root without CAP_LINUX_IMMUTABLE (dropped from the bounding set) cannot set +i."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    make_repo(workdir, seconds=3600)
    root = workdir / "repo"
    until = datetime.now(UTC) + timedelta(hours=1)
    LocalRemote(root).protect_point("20990101T000000Z-cap000", [], ["manifests/x"], until)
    proc = subprocess.run(
        [setpriv, "--bounding-set", "-linux_immutable", HELPER, "apply", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "error: setting the immutable attribute needs root (CAP_LINUX_IMMUTABLE)"
    )
    assert not is_immutable(root / record_name("20990101T000000Z-cap000"))


def test_format3_packs_and_index_made_immutable_and_kept_by_gc(workdir: Path) -> None:
    """Format 3 on an immutable directory: the record names the point's packs and index
    objects, the helper makes them immutable (`rm` fails), and gc still frees the pack of a
    forgotten unlocked point while it leaves every locked pack and index object in place."""
    root = workdir / "repo"
    remote = LocalRemote(root)
    repo = Repository.init(remote, "none", lambda: PASS, pack_size=1 << 20)
    remote.set_lock_policy(LockPolicy(seconds=3600))
    vm = demo_vm(workdir)
    first_hash = disk_hash(vm)
    first = backup(repo, vm).restore_point
    modify_demo_vm(vm, 3)
    second_hash = disk_hash(vm)
    second = backup(repo, vm, "delta").restore_point
    data = {str(p.relative_to(root)) for d in ("packs", "index") for p in (root / d).rglob("*")}
    data = {n for n in data if (root / n).is_file()}
    for point in (first, second):
        record = decode_record(point, (root / record_name(point)).read_bytes())
        assert record is not None and "config" in record.objects
    first_record = decode_record(first, (root / record_name(first)).read_bytes())
    assert first_record is not None and set(first_record.objects) < data | {
        "config",
        manifest_object_name(first),
    }
    helper(root)
    assert all(is_immutable(root / n) for n in data)
    victim = root / sorted(n for n in data if n.startswith("packs/"))[0]
    rm = subprocess.run(["rm", "-f", str(victim)], capture_output=True, text=True)
    assert rm.returncode != 0 and victim.exists()

    remote.set_lock_policy(None)  # a point without a lock: its pack is ordinary garbage later
    modify_demo_vm(vm, 4)
    third = backup(repo, vm, "delta").restore_point
    free = {str(p.relative_to(root)) for p in (root / "packs").rglob("*") if p.is_file()}
    free -= data
    assert free
    with pytest.raises(ObjectLockedError):
        repo.delete_manifest(first)
    repo.delete_manifest(third)
    report = collect_garbage(repo, SilentProgress())
    assert report.packs is not None and not report.packs.refused
    left = {str(p.relative_to(root)) for d in ("packs", "index") for p in (root / d).rglob("*")}
    assert data <= left and not free & left  # locked kept; the unlocked point's data pack gone
    for point, want in ((first, first_hash), (second, second_hash)):
        (workdir / point).mkdir()
        out = restore_vm(repo, FilesConnector(), point, str(workdir / point), SilentProgress())
        assert disk_hash(Path(out.location)) == want
