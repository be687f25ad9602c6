"""In-place and differential restore over an existing libvirt domain (real libvirtd + QEMU):
guest writes through the running VM's block layer after a backup, then a restore in place
writes exactly the 4 MiB chunks those writes touched, leaves the volumes hash-equal to the
restore point, and a second restore writes nothing. Refusals (running domain, changed disk set,
resized disk, vanished domain) are one-line errors that leave the disks untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.libvirt import libvirt_env as lv
from tests.libvirt.conftest import LibvirtEnv
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.restore.in_place import in_place_target
from vmkeep.errors import ConnectorError, NotFoundError, UsageError
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import DEFAULT_CHUNK_SIZE
from vmkeep.repository.repository import Repository

MiB = lv.MiB
MakeDomain = Callable[..., lv.TestDomain]


@pytest.fixture
def connector(libvirt_env: LibvirtEnv) -> Iterator[LibvirtConnector]:
    c = LibvirtConnector(lv.URI)
    yield c
    c.close()


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(LocalRemote(tmp_path / "repo"), "none", lambda: b"")


def backup(repo: Repository, connector: LibvirtConnector, d: lv.TestDomain) -> str:
    opts = BackupOptions(mode="full")
    return backup_vm(repo, connector, d.name, opts, SilentProgress(), "libvirt").restore_point


def image_sha(d: lv.TestDomain, target: str, tmp_path: Path) -> str:
    raw = tmp_path / f"{d.name}-{target}.raw"
    digest = lv.sha256(lv.qemu_img_raw(d.disk(target).path, raw, force_share=True))
    raw.unlink()
    return digest


def restore_in_place(
    repo: Repository, connector: LibvirtConnector, point: str, d: lv.TestDomain
) -> int:
    report = restore_vm(repo, connector, point, d.dom.UUIDString(), SilentProgress(), in_place=True)
    assert report.location == d.name
    return report.bytes_written


def test_differential_restore_writes_only_changed_chunks(
    connector: LibvirtConnector, repo: Repository, make_domain: MakeDomain, tmp_path: Path
) -> None:
    d = make_domain([64 * MiB, 16 * MiB])
    d.guest_write("vda", 0, os.urandom(40 * MiB))  # mostly allocated
    d.guest_write("vdb", 4 * MiB, 0x77, 2 * MiB)
    point = backup(repo, connector, d)
    at_backup = {t: lv.sha256(bytes(d.disk(t).model)) for t in ("vda", "vdb")}
    # Scattered guest writes: 6 distinct 4 MiB chunks of vda (one write straddles chunks 7|8,
    # one lands in chunk 12, beyond the data: the restore must make it zeros again) and one
    # chunk of vdb. 1.3 MiB changed in all.
    writes = [
        ("vda", 1 * MiB + 512, 64 * 1024),  # chunk 0
        ("vda", 9 * MiB, 512 * 1024),  # chunk 2
        ("vda", 20 * MiB + 4096, 4096),  # chunk 5
        ("vda", 32 * MiB - 128 * 1024, 256 * 1024),  # chunks 7 and 8
        ("vda", 50 * MiB, 300 * 1024),  # chunk 12, a hole at backup time
        ("vdb", 5 * MiB, 128 * 1024),  # vdb chunk 1
    ]
    for target, off, n in writes:
        d.guest_write(target, off, os.urandom(n))
    chunks = {
        (t, i)
        for t, off, n in writes
        for i in range(off // DEFAULT_CHUNK_SIZE, -(-(off + n) // DEFAULT_CHUNK_SIZE))
    }
    assert len(chunks) == 7
    assert image_sha(d, "vda", tmp_path) != at_backup["vda"]
    d.stop()

    written = restore_in_place(repo, connector, point, d)
    assert written == len(chunks) * DEFAULT_CHUNK_SIZE  # ~1.3 MiB changed -> 7 whole chunks
    assert {t: image_sha(d, t, tmp_path) for t in at_backup} == at_backup
    hole = [
        m
        for m in lv.qemu_img_map(d.disk("vda").path)
        if m["start"] <= 50 * MiB < m["start"] + m["length"]
    ]
    assert hole and not hole[0]["data"]  # chunk 12 was zeroed by unmapping, not by writing zeros
    assert restore_in_place(repo, connector, point, d) == 0  # nothing differs any more
    check = lv.qemu_img_info(d.disk("vda").path)
    assert check["format"] == "qcow2"
    d.start()  # the domain is still the same, bootable VM
    assert d.dom.isActive()


def test_running_domain_refused_unless_forced(
    connector: LibvirtConnector, repo: Repository, make_domain: MakeDomain, tmp_path: Path
) -> None:
    d = make_domain([16 * MiB])
    d.guest_write("vda", 0, os.urandom(3 * MiB))
    point = backup(repo, connector, d)
    at_backup = lv.sha256(bytes(d.disk("vda").model))
    d.guest_write("vda", 8 * MiB, os.urandom(MiB))
    changed = image_sha(d, "vda", tmp_path)
    with pytest.raises(ConnectorError, match=r"is running.*--force") as exc:
        restore_in_place(repo, connector, point, d)
    assert "\n" not in str(exc.value)
    assert d.dom.isActive() and image_sha(d, "vda", tmp_path) == changed  # untouched
    connector.power_off_running = True
    assert restore_in_place(repo, connector, point, d) == DEFAULT_CHUNK_SIZE
    assert not d.dom.isActive()
    assert image_sha(d, "vda", tmp_path) == at_backup


def test_changed_disks_and_missing_domain_are_refused(
    libvirt_env: LibvirtEnv,
    connector: LibvirtConnector,
    repo: Repository,
    make_domain: MakeDomain,
    tmp_path: Path,
) -> None:
    import libvirt

    d = make_domain([16 * MiB], start=False)
    point = backup(repo, connector, d)  # offline backup of an empty disk
    # A disk added since the point.
    extra = libvirt_env.pool.create_volume(f"{d.name}-vdb.qcow2", 16 * MiB)
    d.disks.append(lv.Disk("vdb", extra, 16 * MiB))
    one_disk = d.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    two_disks = lv.domain_xml(d.name, d.disks).split("<devices>")[1].split("<controller")[0]
    devices = one_disk.split("<devices>")
    d.dom = libvirt_env.conn.defineXML(
        devices[0] + "<devices>" + two_disks + devices[1].split("</disk>", 1)[1]
    )
    with pytest.raises(UsageError, match="disks changed") as exc:
        restore_in_place(repo, connector, point, d)
    assert "\n" not in str(exc.value)
    # Back to one disk, but resized.
    d.dom = libvirt_env.conn.defineXML(one_disk)
    vol = libvirt_env.conn.storageVolLookupByPath(str(d.disk("vda").path))
    vol.resize(32 * MiB, 0)
    before = image_sha(d, "vda", tmp_path)
    with pytest.raises(UsageError, match="disks changed"):
        restore_in_place(repo, connector, point, d)
    assert image_sha(d, "vda", tmp_path) == before
    # The domain is gone: the CLI's lookup says to restore as a new domain.
    manifest = repo.load_manifest(point)
    d.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    with pytest.raises(NotFoundError, match=r"no longer exists.*as a new domain") as nf:
        in_place_target(connector, connector.uri, manifest.vm_uuid, manifest.vm_name)
    assert "\n" not in str(nf.value)


def test_cli_in_place_force_and_keep_macs(
    libvirt_env: LibvirtEnv, make_domain: MakeDomain, tmp_path: Path
) -> None:
    cli = Cli(tmp_path)
    repo = str(tmp_path / "repo")
    cli("init", repo)
    d = make_domain([16 * MiB])
    d.guest_write("vda", MiB, os.urandom(2 * MiB))
    at_backup = lv.sha256(bytes(d.disk("vda").model))
    args = ("--connector", "libvirt", "--remote", repo, "--json")
    point = cli("backup", d.name, *args).json()["restore_point"]
    d.guest_write("vda", 12 * MiB, os.urandom(4096))
    refused = cli("restore", point, "--in-place", *args, ok=False)
    assert "is running" in refused.err and "--force" in refused.err
    assert d.dom.isActive()
    out = cli("restore", point, "--in-place", "--force", *args).json()
    assert out["location"] == d.name and out["bytes_written"] == DEFAULT_CHUNK_SIZE
    assert not d.dom.isActive() and image_sha(d, "vda", tmp_path) == at_backup
    help_text = cli("restore", "--help").out
    assert "powered off hard" in " ".join(help_text.split())
    # --keep-macs: a new domain with the original's MAC address.
    import libvirt

    iface = "<interface type='user'><mac address='52:54:00:aa:bb:01'/></interface>"
    xml = d.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace("</devices>", iface + "</devices>")
    d.dom = libvirt_env.conn.defineXML(xml)
    point2 = cli("backup", d.name, *args).json()["restore_point"]
    names = [lv.unique_name("keepmac"), lv.unique_name("newmac")]
    try:
        pool = ("--to", libvirt_env.pool.name)
        cli("restore", point2, "--name", names[0], "--keep-macs", *pool, *args)
        cli("restore", point2, "--name", names[1], *pool, *args)
        macs = [_macs(libvirt_env.conn.lookupByName(n).XMLDesc(0)) for n in names]
        assert macs[0] == ["52:54:00:aa:bb:01"]
        assert len(macs[1]) == 1 and macs[1] != macs[0]
    finally:
        from tests.libvirt.test_restore import remove_domain

        for n in names:
            remove_domain(libvirt_env, n)
    d.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    gone = cli("restore", point, "--in-place", *args, ok=False)
    assert "no longer exists" in gone.err and "as a new domain" in gone.err


def _macs(xml: str) -> list[str]:
    import xml.etree.ElementTree as ET

    return [m.get("address", "") for m in ET.fromstring(xml).iterfind("./devices/interface/mac")]


def test_block_disks_are_refused(
    libvirt_env: LibvirtEnv,
    connector: LibvirtConnector,
    repo: Repository,
    make_domain: MakeDomain,
    tmp_path: Path,
) -> None:
    """A disk that is a block device (here a loop device) is refused in one line before
    anything is written: in place writes only file-backed disks."""
    import libvirt

    backing = tmp_path / "block.raw"
    backing.write_bytes(b"\x07" * MiB + bytes(15 * MiB))
    loop = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if loop.returncode:
        pytest.skip(f"no loop device: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    try:
        block = make_domain([], start=False)
        block_xml = block.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace(
            "<devices>",
            "<devices><disk type='block' device='disk'><driver name='qemu' type='raw'/>"
            f"<source dev='{dev}'/><target dev='vda' bus='virtio'/></disk>",
        )
        block.dom = libvirt_env.conn.defineXML(block_xml)
        block.start()  # (an offline backup of a block device is refused by the raw reader)
        point = backup(repo, connector, block)
        block.stop()
        backing.write_bytes(bytes(16 * MiB))
        with pytest.raises(ConnectorError, match="is a block disk") as exc:
            restore_in_place(repo, connector, point, block)
        assert "\n" not in str(exc.value)
        assert backing.read_bytes() == bytes(16 * MiB)  # nothing written
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_raw_disk_in_place(
    libvirt_env: LibvirtEnv,
    connector: LibvirtConnector,
    repo: Repository,
    make_domain: MakeDomain,
    tmp_path: Path,
) -> None:
    """A raw volume: the differing chunk is rewritten, a chunk that must become zeros again is
    punched back into a hole (the file's allocation shrinks)."""
    d = make_domain([], start=False)
    path = libvirt_env.pool.create_volume(f"{d.name}-vda.img", 16 * MiB, fmt="raw")
    d.disks.append(lv.Disk("vda", path, 16 * MiB, fmt="raw"))
    d.dom = libvirt_env.conn.defineXML(
        lv.domain_xml(d.name, d.disks).replace(
            f"<name>{d.name}</name>", f"<name>{d.name}</name><uuid>{d.dom.UUIDString()}</uuid>"
        )
    )
    d.start()
    d.guest_write("vda", 0, os.urandom(MiB))
    point = backup(repo, connector, d)
    at_backup = lv.sha256(bytes(d.disk("vda").model))
    d.guest_write("vda", 512 * 1024, os.urandom(4096))  # chunk 0
    d.guest_write("vda", 9 * MiB, os.urandom(2 * MiB))  # chunk 2, zeros in the point
    d.stop()
    allocated = path.stat().st_blocks * 512
    assert restore_in_place(repo, connector, point, d) == 2 * DEFAULT_CHUNK_SIZE
    assert lv.sha256(path.read_bytes()) == at_backup
    assert path.stat().st_blocks * 512 <= allocated - 2 * MiB  # the 2 MiB became a hole


DIE_AFTER_FIRST_WRITE = """
import os, sys
from vmkeep.connectors.libvirt.transport.image_nbd import NbdImage
real = NbdImage.zero
def zero(self, offset, length):  # the process dies once a chunk is zeroed in place
    real(self, offset, length)
    os._exit(9)
NbdImage.zero = zero
from vmkeep.interfaces.cli.app import main
sys.argv = ["vmkeep", *sys.argv[1:]]
main()
"""


def test_killed_in_place_restore_leaves_no_files_and_the_next_one_finishes(
    connector: LibvirtConnector, repo: Repository, make_domain: MakeDomain, tmp_path: Path
) -> None:
    """An in-place restore that dies mid-write (SIGKILL at random instants found this) leaves
    the domain defined with its disks, no qemu-nbd running, and no qemu-nbd log file (one was
    left in $TMPDIR per open image); running the restore again finishes it."""
    import libvirt

    d = make_domain([16 * MiB, 8 * MiB])
    d.guest_write("vda", 0, os.urandom(3 * MiB))
    point = backup(repo, connector, d)
    at_backup = {t: lv.sha256(bytes(d.disk(t).model)) for t in ("vda", "vdb")}
    d.guest_write("vda", 8 * MiB, os.urandom(MiB))  # zeros in the point: both are zeroed
    d.guest_write("vdb", 0, os.urandom(MiB))
    d.stop()
    xml = d.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    cli = Cli(tmp_path)
    args = (
        "restore",
        point,
        "--in-place",
        "--connector",
        "libvirt",
        "--remote",
        str(tmp_path / "repo"),
    )
    died = subprocess.run(
        [sys.executable, "-c", DIE_AFTER_FIRST_WRITE, *args],
        env=dict(cli.env, TMPDIR=str(tmp)), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert died.returncode == 9, died.stderr[-2000:]
    assert list(tmp.iterdir()) == []
    assert d.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == xml
    assert not any(_qemu_nbd_serving(disk.path) for disk in d.disks)
    assert {t: image_sha(d, t, tmp_path) for t in at_backup} != at_backup  # half restored
    cli(*args)
    assert {t: image_sha(d, t, tmp_path) for t in at_backup} == at_backup


def _qemu_nbd_serving(image: Path) -> list[str]:
    """pids of live (not zombie) qemu-nbd processes with `image` on their command line."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmd[0].endswith(b"qemu-nbd") and str(image).encode() in cmd and state != "Z":
            found.append(pid)
    return found


DIE_WITH_IMAGE_OPEN = """
import os, subprocess, sys
from vmkeep.connectors.libvirt.transport.image_nbd import open_image
def sockets():
    found = set()
    for f in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{f}").startswith("socket:"):
                found.add(int(f))
        except OSError:  # the directory listing's own fd
            pass
    return found
before = sockets()
image = open_image(sys.argv[1], "qcow2", writable=True)
# Another process keeps the client end of the NBD socket open, so qemu-nbd sees no EOF: like a
# vmkeep killed before libnbd had connected, only the death signal can stop it now.
holder = subprocess.Popen(["sleep", "120"], pass_fds=sorted(sockets() - before),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(holder.pid, flush=True)
os._exit(9)
"""


def test_qemu_nbd_dies_with_a_killed_vmkeep(make_domain: MakeDomain, tmp_path: Path) -> None:
    """The qemu-nbd of an image vmkeep opened exits when vmkeep is killed, even while its
    connection stays open: one left running (vmkeep killed before libnbd connected) held the
    image's write lock forever, so the restored domain could not start."""
    import signal
    import time

    d = make_domain([8 * MiB], start=False)
    path = d.disks[0].path
    out = tmp_path / "out"  # a file, not a pipe: a surviving qemu-nbd would keep a pipe open
    with out.open("w") as f:
        died = subprocess.run([sys.executable, "-c", DIE_WITH_IMAGE_OPEN, str(path)],
                              stdout=f, stderr=f, timeout=60)  # fmt: skip
    assert died.returncode == 9, out.read_text()[-2000:]
    holder = int(out.read_text().split()[0])
    try:
        deadline = time.monotonic() + 10
        while _qemu_nbd_serving(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _qemu_nbd_serving(path) == []
        d.start()  # the image's write lock is free
    finally:
        os.kill(holder, signal.SIGKILL)
