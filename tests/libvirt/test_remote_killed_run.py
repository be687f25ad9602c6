"""A `vmkeep backup` over a remote URI (qemu+ssh:// to the local libvirtd, ssh_transport.py)
SIGKILLed while its pull job runs: the job, its scratch files next to the image and its
checkpoint stay on the hypervisor. The next run over that URI finds the dead run's owner record
on this host (remote_runs.py), ends that job (and only a job that is that run's), deletes the
checkpoint and scratch files, and backs up; a job started by anything else is left alone. A
shut-off backup over another spelling of the URI cleans up too."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import VMKEEP, Cli, disk_hashes
from tests.libvirt import libvirt_env as lv
from tests.libvirt.backup_points import image_bitmaps, vmkeep_checkpoints
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.ssh_transport import free_port, ssh_libvirt_uri
from tests.libvirt.test_live_remote_uri import HOST, listening, scratch_files
from tests.stored_data import data_objects
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.backup.workdir import remove_workdir, stale_workdirs
from vmkeep.connectors.libvirt.connector import TcpExport

MiB = lv.MiB
BUSY = "already has a backup job running"


@pytest.fixture(scope="module")
def ssh_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with ssh_libvirt_uri(tmp_path_factory.mktemp("sshd")) as uri:
        yield uri


@pytest.fixture(autouse=True)
def no_records_left(ssh_uri: str) -> Iterator[None]:
    """Records a failed test leaves would never be cleaned: the URI (sshd port) is this run's."""
    yield
    for stale in stale_workdirs(uri=ssh_uri):
        remove_workdir(stale.path, [])


def backup_job(dom: object) -> bool:
    import libvirt

    stats = dom.jobStats(0)  # type: ignore[attr-defined]
    return bool(stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP)


def stored_chunks(repo: Path) -> int:
    """Chunk objects, or format 3 packs (being) written."""
    return len(data_objects(repo))


def kill_mid_job(
    cli: Cli, d: lv.TestDomain, repo: Path, args: tuple[str, ...]
) -> tuple[Path, dict[str, object]]:
    """Run `vmkeep backup` and SIGKILL it once its job runs and data read from the job's export
    reached the repository (a pull job's jobStats count no bytes read); the dead run's record
    (path, marker)."""
    uuid = d.dom.UUIDString()
    proc = subprocess.Popen(
        [VMKEEP, "backup", d.name, *args],
        env=cli.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    chunks = stored_chunks(repo)
    while not (
        any("export" in o for o in lv.run_records(uuid).values())
        and backup_job(d.dom)
        and stored_chunks(repo) > chunks
    ):
        assert proc.poll() is None, "the backup ended before it could be killed"
        assert time.monotonic() < deadline, d.dom.jobStats(0)
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    ((path, owner),) = lv.run_records(uuid).items()
    return path, owner


def fill(d: lv.TestDomain, mib: int) -> None:
    for off in range(0, mib, 12):
        d.guest_write("vda", off * MiB, os.urandom(min(12, mib - off) * MiB))


def test_killed_remote_backup_is_cleaned_up_by_the_next_one(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    ssh_uri: str,
    tmp_path: Path,
) -> None:
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    d = make_domain((128 * MiB,))
    other = make_domain((16 * MiB,))
    fill(d, 120)
    other.guest_write("vda", 0, os.urandom(2 * MiB))
    port = free_port()
    args = ("--connector", "libvirt", "--uri", ssh_uri, "--remote", str(repo), "--json",
            "--nbd-host", HOST, "--nbd-port", str(port))  # fmt: skip

    # A live remote run of another domain, in this process, while the cleanup happens: its
    # record is locked, so it is untouched.
    bystander = LibvirtConnector(ssh_uri)
    bystander.nbd = TcpExport(HOST, free_port())
    session = bystander.begin_backup(bystander.get_vm(other.name), {})
    try:
        (live_record,) = lv.run_records(other.dom.UUIDString())
        stale, owner = kill_mid_job(cli, d, repo, args)
        killed = str(owner["checkpoint"])
        assert owner["uri"] == ssh_uri and owner["export"] == [HOST, port]
        # The failure fixed here: the job, its scratch file and its checkpoint stay behind.
        assert lv.job_active(d.dom) and listening(port)
        assert scratch_files(d) == [f"{d.disks[0].path.name}.{killed}"]
        assert vmkeep_checkpoints(d) == [killed]

        done = cli("backup", d.name, *args).json()
        assert live_record.exists() and lv.job_active(other.dom)
        assert session.readers["vda"].read(0, 2 * MiB) == bytes(other.disks[0].model[: 2 * MiB])
    finally:
        session.finish(ok=True)
        bystander.close()
    assert lv.run_records(other.dom.UUIDString()) == {}  # removed when that run ended normally

    (note,) = [n for n in done["notes"] if "killed vmkeep run" in n]
    assert f"domain {d.name}" in note and stale.name in note, note
    assert "backup job ended" in note and f"checkpoint {killed} deleted" in note, note
    assert "1 scratch file(s) removed by libvirt with the job" in note, note
    assert not stale.exists() and lv.run_records(d.dom.UUIDString()) == {}
    assert not lv.job_active(d.dom) and not listening(port) and scratch_files(d) == []
    assert killed not in vmkeep_checkpoints(d) and len(vmkeep_checkpoints(d)) == 1
    assert done["mode"] == "full" and done["bytes_read"] >= 120 * MiB
    out = cli("restore", done["restore_point"], "--remote", str(repo), "--to", str(tmp_path / "r"))
    (vm_dir,) = (tmp_path / "r").iterdir()
    assert out.code == 0 and disk_hashes(vm_dir) == {"vda": lv.sha256(d.disks[0].model)}


def test_job_of_another_program_is_left_alone(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    ssh_uri: str,
    tmp_path: Path,
) -> None:
    """A killed run's record for the domain, whose job was ended by hand, and then a backup job
    started by another program: the next run refuses as before and touches neither that job
    nor (while it runs) the record; once it is gone, the record is cleaned without a job."""
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    d = make_domain((96 * MiB,))
    fill(d, 90)
    port = free_port()
    args = ("--connector", "libvirt", "--uri", ssh_uri, "--remote", str(repo), "--json",
            "--nbd-host", HOST, "--nbd-port", str(port))  # fmt: skip
    stale, owner = kill_mid_job(cli, d, repo, args)
    killed = str(owner["checkpoint"])
    d.dom.abortJob()  # an administrator ends the dead run's job
    lv.wait_no_job(d.dom, 15)

    sock = lv.SCRATCH_ROOT / f"{lv.PREFIX}{os.getpid()}-foreign"
    sock.mkdir(exist_ok=True)
    os.chown(sock, *_qemu_ids())
    foreign = lv.backup_xml(sock / "nbd.sock", sock, ["vda"])
    try:
        d.dom.backupBegin(foreign, None, 0)
        before = d.dom.backupGetXMLDesc(0)
        refused = cli("backup", d.name, *args, ok=False)
        assert BUSY in refused.err and f"virsh domjobabort {d.name}" in refused.err, refused.err
        assert lv.job_active(d.dom) and d.dom.backupGetXMLDesc(0) == before
        assert (sock / "nbd.sock").exists()
        assert stale.exists() and killed in vmkeep_checkpoints(d)  # kept for a later run
    finally:
        if lv.job_active(d.dom):
            d.dom.abortJob()
            lv.wait_no_job(d.dom, 15)
        shutil.rmtree(sock, ignore_errors=True)

    done = cli("backup", d.name, *args).json()
    (note,) = [n for n in done["notes"] if "killed vmkeep run" in n]
    assert "backup job ended" not in note and f"checkpoint {killed} deleted" in note, note
    assert not stale.exists() and killed not in vmkeep_checkpoints(d)
    assert not lv.job_active(d.dom) and scratch_files(d) == []


def test_killed_run_is_cleaned_up_by_a_shut_off_backup_over_another_spelling_of_the_uri(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    ssh_uri: str,
    tmp_path: Path,
) -> None:
    """The dead run's record names `root@127.0.0.1`; the domain is shut off since (its job went
    with QEMU, its checkpoint and bitmap stayed), and the next backup is an offline one over
    `127.0.0.1` (ssh logs in as the same root): the record matches by the hypervisor's identity,
    the checkpoint goes, its bitmap is removed from the image over ssh."""
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    d = make_domain((64 * MiB,))
    fill(d, 60)
    args = ("--connector", "libvirt", "--remote", str(repo), "--json")
    live = ("--uri", ssh_uri, "--nbd-host", HOST, "--nbd-port", str(free_port()))
    stale, owner = kill_mid_job(cli, d, repo, (*args, *live))
    killed = str(owner["checkpoint"])
    assert owner["host"] and owner["uri"] == ssh_uri
    d.stop()
    assert vmkeep_checkpoints(d) == [killed] and image_bitmaps(d) == {"vda": [killed]}

    other_spelling = ssh_uri.replace("root@", "")
    done = cli("backup", d.name, *args, "--uri", other_spelling).json()
    (note,) = [n for n in done["notes"] if "killed vmkeep run" in n]
    assert stale.name in note and f"checkpoint {killed} deleted" in note, note
    assert not stale.exists() and lv.run_records(d.dom.UUIDString()) == {}
    (made,) = vmkeep_checkpoints(d)
    assert made != killed and image_bitmaps(d) == {"vda": [made]}
    assert any("qemu-nbd over ssh" in n for n in done["notes"]), done["notes"]
    out = cli("restore", done["restore_point"], "--remote", str(repo), "--to", str(tmp_path / "r"))
    (vm_dir,) = (tmp_path / "r").iterdir()
    assert out.code == 0 and disk_hashes(vm_dir) == {"vda": lv.sha256(d.disks[0].model)}


def _qemu_ids() -> tuple[int, int]:
    import pwd

    for user in ("libvirt-qemu", "qemu"):
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            continue
        return pw.pw_uid, pw.pw_gid
    return os.getuid(), os.getgid()
