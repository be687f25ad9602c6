"""Faults in the middle of a live backup, against a real libvirtd + QEMU: the NBD export lost
(QEMU killed, the job aborted by an administrator), and a `vmkeep backup` killed with SIGKILL.
Each ends with a one-line error (or a dead process), no stale job, checkpoint or work
directory, nothing listed; and the next backup works and restores byte-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import VMKEEP, Cli, disk_hashes
from tests.libvirt import libvirt_env as lv
from tests.libvirt.backup_points import (
    FaultAfterFirstChunk,
    backup,
    dirty_chunks,
    models,
    new_repo,
    point_ids,
    restored_hashes,
    vmkeep_checkpoints,
)
from tests.libvirt.begin_kill import killed_inside_backup_begin
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.test_connector import read_image
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.backup.workdir import MARKER
from vmkeep.errors import ConnectorError

MiB = lv.MiB


def fill(d: lv.TestDomain, target: str, mib: int) -> None:
    for off in range(0, mib, 12):
        d.guest_write(target, off * MiB, os.urandom(min(12, mib - off) * MiB))


def backed_up_domain(
    make_domain: Callable[..., lv.TestDomain], tmp_path: Path, mib: int
) -> tuple[Cli, Path, lv.TestDomain, tuple[str, ...]]:
    """A repository and a 64 MiB domain with `mib` MiB written, backed up once through the CLI;
    the CLI arguments that back it up again."""
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    d = make_domain((64 * MiB,))
    fill(d, "vda", mib)
    args = ("--connector", "libvirt", "--remote", str(repo), "--json")
    cli("backup", d.name, *args)
    return cli, repo, d, args


def assert_nothing_left(d: lv.TestDomain, checkpoints_before: list[str]) -> None:
    assert not lv.job_active(d.dom)
    assert lv.run_dirs(d.dom.UUIDString()) == []
    assert vmkeep_checkpoints(d) == checkpoints_before
    assert all(p.suffix == ".qcow2" for p in d.pool.path.iterdir())  # no scratch in the pool


@pytest.mark.parametrize("fault", ["qemu-killed", "job-aborted"])
def test_nbd_export_lost_mid_backup(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    connector: LibvirtConnector,
    tmp_path: Path,
    fault: str,
) -> None:
    repo = new_repo(tmp_path / "repo")
    d = make_domain((96 * MiB,))
    fill(d, "vda", 8)
    full = backup(repo, connector, d, "full")
    before = vmkeep_checkpoints(d)
    fill(d, "vda", 96)  # every chunk dirty: the delta reads 24 chunks

    admin = lv.wait_for_libvirtd()  # another client, as `virsh domjobabort` would be
    try:
        action = d.kill_qemu if fault == "qemu-killed" else admin.lookupByName(d.name).abortJob
        with pytest.raises(ConnectorError, match="NBD") as info:
            backup(repo, connector, d, "delta", FaultAfterFirstChunk(action))
    finally:
        admin.close()
    assert "\n" not in str(info.value)
    assert point_ids(repo) == [full.restore_point]
    assert_nothing_left(d, before)
    assert d.dom.isActive() == (fault == "job-aborted")

    if not d.dom.isActive():
        d.start()  # QEMU died with the bitmaps in memory: the next backup must read in full
    d.guest_write("vda", 50 * MiB, 0x6B, 4096)
    again = backup(repo, connector, d, "delta")
    if fault == "job-aborted":
        assert again.stats.bytes_chunks == 24 * 4 * MiB, again.notes  # all 96 MiB were written
        assert not any("full read" in n for n in again.notes), again.notes
    else:
        assert any("full read" in n for n in again.notes), again.notes
    assert restored_hashes(repo, again.restore_point, tmp_path / "r") == models(d)
    assert len(vmkeep_checkpoints(d)) == 1 and not lv.job_active(d.dom)


def test_killed_backup_is_cleaned_up_by_the_next_one(
    libvirt_env: LibvirtEnv, make_domain: Callable[..., lv.TestDomain], tmp_path: Path
) -> None:
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    d = make_domain((64 * MiB,))
    other = make_domain((16 * MiB,))
    fill(d, "vda", 60)
    other.guest_write("vda", 0, os.urandom(2 * MiB))
    uuid = d.dom.UUIDString()
    args = ("--connector", "libvirt", "--remote", str(repo), "--json")

    proc = subprocess.Popen(
        [VMKEEP, "backup", d.name, *args],
        env=cli.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (lv.run_dirs(uuid) and lv.job_active(d.dom)):
        assert proc.poll() is None, "the backup ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    (stale,) = lv.run_dirs(uuid)
    killed_checkpoint = json.loads((stale / MARKER).read_text())["checkpoint"]
    assert lv.job_active(d.dom) and vmkeep_checkpoints(d) == [killed_checkpoint]

    # A live run of another domain, in this process, while the cleanup happens: untouched.
    bystander = LibvirtConnector(lv.URI)
    session = bystander.begin_backup(bystander.get_vm(other.name), {})
    try:
        (live_dir,) = lv.run_dirs(other.dom.UUIDString())
        done = cli("backup", d.name, *args).json()
        assert live_dir.exists() and lv.job_active(other.dom)
        assert lv.sha256(read_image(session.readers["vda"])) == lv.sha256(other.disks[0].model)
    finally:
        session.finish(ok=True)
        bystander.close()

    assert not stale.exists()
    assert not lv.job_active(d.dom)
    assert killed_checkpoint not in vmkeep_checkpoints(d) and len(vmkeep_checkpoints(d)) == 1
    listed = cli("list", "--remote", str(repo), "--json").json()["restore_points"]
    assert [p["restore_point"] for p in listed] == [done["restore_point"]], listed
    assert done["bytes_chunks"] == dirty_chunks(("vda", 0, 60 * MiB))
    out = cli("restore", done["restore_point"], "--remote", str(repo), "--to", str(tmp_path / "r"))
    assert out.code == 0
    (vm_dir,) = (tmp_path / "r").iterdir()
    assert disk_hashes(vm_dir) == {"vda": lv.sha256(d.disks[0].model)}


def test_killed_offline_backup_leaves_no_qemu_nbd(
    libvirt_env: LibvirtEnv, make_domain: Callable[..., lv.TestDomain], tmp_path: Path
) -> None:
    """A vmkeep killed during an offline delta: the next backup stops any qemu-nbd left, removes
    the killed run's offline checkpoint and its directory, and is still a delta; the domain then
    starts (the image is not left locked) and the live delta after it is exact."""
    cli, repo, d, args = backed_up_domain(make_domain, tmp_path, 4)
    fill(d, "vda", 60)
    d.stop()
    uuid = d.dom.UUIDString()
    proc = subprocess.Popen(
        [VMKEEP, "backup", d.name, "--mode", "delta", *args],
        env=cli.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (lv.run_dirs(uuid) and list(lv.run_dirs(uuid)[0].glob("*.sock"))):
        assert proc.poll() is None, "the backup ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # qemu-nbd dies with vmkeep (PR_SET_PDEATHSIG) except when the signal lands in qemu-nbd's
    # own start-up window (it then forgets it): the next backup stops any survivor first.
    again = cli("backup", d.name, "--mode", "delta", *args).json()
    assert _qemu_nbd_serving(d.disks[0].path) == []
    assert lv.run_dirs(uuid) == [] and len(vmkeep_checkpoints(d)) == 1
    assert again["bytes_chunks"] == 15 * 4 * MiB, again["notes"]  # offline delta since run 1
    d.start()  # the image is not locked by a leftover qemu-nbd
    d.guest_write("vda", 62 * MiB, 0x5A, 4096)
    done = cli("backup", d.name, "--mode", "delta", *args).json()
    assert lv.run_dirs(uuid) == [] and len(vmkeep_checkpoints(d)) == 1
    assert done["bytes_chunks"] == 4 * MiB, done["notes"]  # live delta on the offline checkpoint
    out = cli("restore", done["restore_point"], "--remote", str(repo), "--to", str(tmp_path / "r"))
    assert out.code == 0
    (vm_dir,) = (tmp_path / "r").iterdir()
    assert disk_hashes(vm_dir) == {"vda": lv.sha256(d.disks[0].model)}


def _qemu_nbd_serving(image: Path) -> list[str]:
    """`pid state ppid` of live qemu-nbd processes serving `image`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"qemu-nbd") and str(image).encode() in cmd and stat[0] != "Z":
            found.append(f"{pid} {stat[0]} ppid={stat[1]}")
    return found


DIE_AFTER_MANIFEST = """
import os, sys
from vmkeep.connectors.libvirt.backup.live import LiveBackupSession
def finish(self, ok):  # the process dies after the manifest, before ending the job
    if ok:
        os._exit(9)
LiveBackupSession.finish = finish
from vmkeep.interfaces.cli.app import main
sys.argv = ["vmkeep", *sys.argv[1:]]
main()
"""


def test_run_killed_after_its_restore_point_keeps_the_checkpoint_the_point_uses(
    libvirt_env: LibvirtEnv, make_domain: Callable[..., lv.TestDomain], tmp_path: Path
) -> None:
    """A run that dies between writing its manifest and ending its job made a good restore
    point: the next run ends the stale job but keeps that point's checkpoint, so its delta is
    still incremental (deleting it forced a full read)."""
    cli, repo, d, args = backed_up_domain(make_domain, tmp_path, 60)
    d.guest_write("vda", 5 * MiB, os.urandom(MiB))
    died = subprocess.run(
        [str(Path(VMKEEP).with_name("python")), "-c", DIE_AFTER_MANIFEST, "backup", d.name,
         *args, "--mode", "delta"],
        env=cli.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert died.returncode == 9, died.stderr[-2000:]
    listed = cli("list", "--remote", str(repo), "--json").json()["restore_points"]
    killed_point = max(p["restore_point"] for p in listed)
    (stale,) = lv.run_dirs(d.dom.UUIDString())
    kept = json.loads((stale / MARKER).read_text())["checkpoint"]
    assert lv.job_active(d.dom) and kept in vmkeep_checkpoints(d)

    d.guest_write("vda", 41 * MiB, os.urandom(MiB))
    done = cli("backup", d.name, *args, "--mode", "delta").json()
    assert not any("full read" in n for n in done["notes"]), done["notes"]
    assert done["bytes_chunks"] == dirty_chunks(("vda", 41 * MiB, MiB))  # only since `kept`
    assert any(f"checkpoint {kept} kept" in n for n in done["notes"]), done["notes"]
    assert not stale.exists() and not lv.job_active(d.dom)
    assert len(vmkeep_checkpoints(d)) == 1 and kept not in vmkeep_checkpoints(d)
    listed = cli("list", "--remote", str(repo), "--json").json()["restore_points"]
    assert sorted(p["restore_point"] for p in listed)[-2:] == [killed_point, done["restore_point"]]
    out = cli("restore", done["restore_point"], "--remote", str(repo), "--to", str(tmp_path / "r"))
    assert out.code == 0
    (vm_dir,) = (tmp_path / "r").iterdir()
    assert disk_hashes(vm_dir) == {"vda": lv.sha256(d.disks[0].model)}


def test_backup_killed_inside_backup_begin_is_cleaned_up_after_libvirt_finished_it(
    libvirt_env: LibvirtEnv, make_domain: Callable[..., lv.TestDomain], tmp_path: Path
) -> None:
    """A backup killed while libvirtd still runs its backupBegin (here: QEMU stopped right after
    the checkpoint is listed): the next backup ends the dead run's job, deletes its checkpoint,
    and stays a delta. Deleting that half-made checkpoint before libvirt has finished making it
    crashes libvirtd 9.0 (job_settle.py); here the next backup's first monitor query already
    waits for QEMU, so the explicit settle_stale_jobs in clean_stale_runs is not what this proves
    (test_replication_faults.py reaches the crash without it)."""
    cli, repo, d, args = backed_up_domain(make_domain, tmp_path, 8)
    d.guest_write("vda", 20 * MiB, os.urandom(MiB))
    before = set(vmkeep_checkpoints(d))
    argv = [VMKEEP, "backup", d.name, *args, "--mode", "delta"]
    with killed_inside_backup_begin(
        argv, cli.env, d.dom, lambda: bool(set(vmkeep_checkpoints(d)) - before)
    ):
        done = cli("backup", d.name, *args, "--mode", "delta").json()
    assert libvirt_env.alive()  # libvirtd did not crash
    notes = " ".join(done["notes"])
    assert "cleaned up after a killed vmkeep run" in notes and "job ended" in notes, notes
    assert "full read" not in notes and done["bytes_chunks"] == dirty_chunks(("vda", 20 * MiB, MiB))
    assert not lv.job_active(d.dom) and len(vmkeep_checkpoints(d)) == 1
    out = cli("restore", done["restore_point"], "--remote", str(repo), "--to", str(tmp_path / "r"))
    assert out.code == 0
    (vm_dir,) = (tmp_path / "r").iterdir()
    assert disk_hashes(vm_dir) == {"vda": lv.sha256(d.disks[0].model)}


DIE_AFTER_FIRST_VOLUME_WRITE = """
import os, sys
from vmkeep.connectors.libvirt.restore import new_domain as restore
write, write_parts = restore._VolumeWriter.write, restore._VolumeWriter.write_parts
def die(self, offset, data):  # the restore is killed with its volumes half-written
    write(self, offset, data)
    os._exit(9)
def die_parts(self, offset, parts):  # format 3 chunks are written as their blocks
    write_parts(self, offset, parts)
    os._exit(9)
restore._VolumeWriter.write = die
restore._VolumeWriter.write_parts = die_parts
from vmkeep.interfaces.cli.app import main
sys.argv = ["vmkeep", *sys.argv[1:]]
main()
"""


def test_killed_restore_leaves_volumes_the_next_backup_deletes(
    libvirt_env: LibvirtEnv, make_domain: Callable[..., lv.TestDomain], tmp_path: Path
) -> None:
    """A restore as a new domain SIGKILLed mid-write cannot delete the volumes it made: its run
    directory names them, and the next backup on this host deletes those no domain uses (and
    keeps a restored domain's volumes)."""
    cli, repo, d, args = backed_up_domain(make_domain, tmp_path, 8)
    point = max(
        p["restore_point"]
        for p in cli("list", "--remote", str(repo), "--json").json()["restore_points"]
    )
    pool = libvirt_env.pool
    name = lv.unique_name("halfrestored")
    restore = ["restore", point, "--remote", str(repo), "--connector", "libvirt",
               "--to", pool.name, "--name", name]  # fmt: skip
    died = subprocess.run(
        [str(Path(VMKEEP).with_name("python")), "-c", DIE_AFTER_FIRST_VOLUME_WRITE, *restore],
        env=cli.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert died.returncode == 9, died.stderr[-2000:]
    pool.pool.refresh(0)
    leaked = [v for v in pool.pool.listVolumes() if v.startswith(name)]
    assert leaked, "the killed restore made no volume: nothing to test"
    kept_name = lv.unique_name("restored")
    cli(*restore[:-1], kept_name)  # a finished restore: its volumes must survive the cleanup
    try:
        d.guest_write("vda", 30 * MiB, os.urandom(MiB))
        done = cli("backup", d.name, *args, "--mode", "delta").json()
        pool.pool.refresh(0)
        volumes = pool.pool.listVolumes()
        assert not [v for v in volumes if v.startswith(name)], volumes
        assert [v for v in volumes if v.startswith(kept_name)]
        notes = " ".join(done["notes"])
        assert all(f"half-written volume {v}" in notes for v in leaked), notes
        assert lv.restore_run_dirs(name) == [] and lv.run_dirs(d.dom.UUIDString()) == []
    finally:
        kept = libvirt_env.conn.lookupByName(kept_name)
        for vol in [v for v in pool.pool.listVolumes() if v.startswith(kept_name)]:
            pool.pool.storageVolLookupByName(vol).delete(0)
        kept.undefine()
