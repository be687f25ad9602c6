"""Real libvirt + QEMU for tests: throw-away pools, volumes and guest-less domains.

Everything here talks to a real `libvirtd` on `qemu:///system` (override with
VMKEEP_TEST_LIBVIRT_URI) through the Debian `python3-libvirt` bindings, and to the pull-mode
backup's NBD export through Debian's `python3-libnbd`. See docs/LIBVIRT-NOTES.md for why each
step looks the way it does (qcow2 compat 1.1, socket directory ownership, qemu-io output in the
domain log, ...).

Objects are named `vmkeep-test-<pid>-<random>`, so leftovers of a killed test run can be told
apart from a run in progress (`cleanup_leftovers`).

Domains have no guest OS: SeaBIOS finds nothing to boot and idles, but QEMU's block layer is live,
so "guest" writes are made with the QEMU monitor's `qemu-io` against the virtio device
(`guest_write`), and dirty bitmaps track them exactly as they would track a guest's writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

URI = os.environ.get("VMKEEP_TEST_LIBVIRT_URI", "qemu:///system")
IMAGES_ROOT = Path("/var/lib/libvirt/images")
# QEMU runs as libvirt-qemu: the NBD socket, the backup scratch files and the files qemu-io
# reads its data from must live where that user can create/read files.
SCRATCH_ROOT = Path("/var/lib/libvirt/qemu")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
PREFIX = "vmkeep-test-"
MiB = 1024 * 1024
DEFAULT_GRANULARITY = 64 * 1024  # QEMU's default dirty-bitmap granularity for qcow2 (cluster)


class LibvirtUnavailable(Exception):
    """libvirt/QEMU cannot be used here; tests skip with this reason."""


# --------------------------------------------------------------------------- daemon


def _import_bindings() -> tuple[Any, Any]:
    try:
        libvirt = importlib.import_module("libvirt")
        nbd = importlib.import_module("nbd")
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise LibvirtUnavailable(
            f"python bindings missing ({e}); run scripts/setup.sh --test as root "
            "(libvirt-python from the lock, Debian's python3-libnbd linked into .venv)"
        ) from e
    return libvirt, nbd


def _quiet_libvirt_errors() -> None:
    """The C library prints every error to stderr by default; errors reach us as exceptions."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a killed daemon stays <defunct> until
    init reaps it, and `kill -0`/`pgrep` still see it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pid_running(name: str) -> bool:
    res = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
    return any(_pid_alive(int(p)) for p in res.stdout.split())


def _try_open(uri: str = URI) -> Any | None:
    import libvirt

    try:
        return libvirt.open(uri)
    except libvirt.libvirtError:
        return None


def wait_for_libvirtd(timeout: float = 30.0, uri: str = URI) -> Any:
    """A connection to libvirtd, waiting up to `timeout` seconds for it to answer."""
    deadline = time.monotonic() + timeout
    while True:
        conn = _try_open(uri)
        if conn is not None:
            try:
                conn.listAllDomains()
                return conn
            except Exception:
                with contextlib.suppress(Exception):
                    conn.close()
        if time.monotonic() > deadline:
            raise LibvirtUnavailable(f"libvirtd does not answer on {uri} after {timeout:.0f} s")
        time.sleep(0.2)


def start_daemons() -> None:
    """Start virtlogd and libvirtd (daemonised, as root, no systemd) when not running."""
    if os.geteuid() != 0:
        raise LibvirtUnavailable("libvirtd is not running and starting it needs root")
    for tool in ("virtlogd", "libvirtd", "qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            raise LibvirtUnavailable(f"{tool} not installed; run scripts/install-libvirt.sh")
    for d in ("/run/libvirt", "/var/lib/libvirt/qemu", "/var/lib/libvirt/images"):
        Path(d).mkdir(parents=True, exist_ok=True)
    if not _pid_running("virtlogd"):
        subprocess.run(["virtlogd", "-d"], check=True)
    if not _pid_running("libvirtd"):
        LIBVIRTD_PIDFILE.unlink(missing_ok=True)
        subprocess.run(["libvirtd", "-d"], check=True)


def ensure_libvirtd(uri: str = URI) -> Any:
    """A live connection; starts the daemons on the local system URI if needed.

    Raises LibvirtUnavailable with a human reason when that cannot be done."""
    _import_bindings()
    _quiet_libvirt_errors()
    conn = _try_open(uri)
    if conn is not None:
        return conn
    if uri != "qemu:///system":
        raise LibvirtUnavailable(f"cannot connect to {uri}")
    start_daemons()
    return wait_for_libvirtd(uri=uri)


def restart_libvirtd(timeout: float = 30.0) -> float:
    """Kill libvirtd (by its pid file) and start it again; returns the seconds it took.

    Running domains and their QEMU processes (and pull-mode NBD exports) survive this."""
    t0 = time.monotonic()
    pid = int(LIBVIRTD_PIDFILE.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    LIBVIRTD_PIDFILE.unlink(missing_ok=True)
    subprocess.run(["libvirtd", "-d"], check=True)
    wait_for_libvirtd(timeout).close()
    return time.monotonic() - t0


def libvirtd_restartable() -> str | None:
    """None when restart_libvirtd may be used here, else the reason why not."""
    if os.environ.get("VMKEEP_TEST_NO_LIBVIRTD_RESTART"):
        return "VMKEEP_TEST_NO_LIBVIRTD_RESTART is set"
    if URI != "qemu:///system":
        return f"{URI} is not the local system daemon"
    if os.geteuid() != 0 or not LIBVIRTD_PIDFILE.exists():
        return "libvirtd was not started by `libvirtd -d` here (no /run/libvirtd.pid or not root)"
    return None


def run_markers() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every vmkeep run directory under the scratch root with its owner marker. Tests look only
    at their own runs' (by domain or volume name): another session's may exist meanwhile."""
    from vmkeep.connectors.libvirt.backup.workdir import MARKER, NAME_RE

    for path in SCRATCH_ROOT.iterdir():
        if NAME_RE.fullmatch(path.name):
            try:
                yield path, json.loads((path / MARKER).read_text())
            except (OSError, ValueError):
                continue


def run_records(uuid: str) -> dict[Path, dict[str, Any]]:
    """The run directories (a remote run's owner records too) of domain `uuid`, with markers."""
    return {path: owner for path, owner in run_markers() if owner.get("domain_uuid") == uuid}


def run_dirs(uuid: str) -> list[Path]:
    return list(run_records(uuid))


def restore_run_dirs(volume_prefix: str) -> list[Path]:
    """The run directories of restores that create volumes named `volume_prefix`..."""
    return [
        path
        for path, owner in run_markers()
        if any(vol[-1].startswith(volume_prefix) for vol in owner.get("volumes", []))
    ]


def cleanup_leftovers(conn: Any) -> list[str]:
    """Remove vmkeep-test-* domains/pools/dirs whose creating process is gone."""
    import libvirt

    removed: list[str] = []

    def stale(name: str) -> bool:
        if not name.startswith(PREFIX):
            return False
        try:
            pid = int(name[len(PREFIX) :].split("-", 1)[0])
        except ValueError:
            return False
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    for dom in conn.listAllDomains():
        if stale(dom.name()):
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefineFlags(_UNDEFINE_FLAGS())
            removed.append(f"domain {dom.name()}")
    for pool in conn.listAllStoragePools():
        if stale(pool.name()):
            _delete_pool(pool)
            removed.append(f"pool {pool.name()}")
    for root in (IMAGES_ROOT, SCRATCH_ROOT):
        for d in root.glob(PREFIX + "*"):
            if stale(d.name):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
    return removed


def _UNDEFINE_FLAGS() -> int:
    import libvirt

    return (
        libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )


def unique_name(tag: str = "") -> str:
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}{'-' + tag if tag else ''}"


# --------------------------------------------------------------------------- storage


def _delete_pool(pool: Any) -> None:
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        if not pool.isActive():
            pool.create()
    with contextlib.suppress(libvirt.libvirtError):
        pool.refresh()
        for vol in pool.listAllVolumes():
            with contextlib.suppress(libvirt.libvirtError):
                vol.delete()
    with contextlib.suppress(libvirt.libvirtError):
        pool.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        pool.delete()
    with contextlib.suppress(libvirt.libvirtError):
        pool.undefine()


class TestPool:
    """A `dir` storage pool under /var/lib/libvirt/images/vmkeep-test-*."""

    __test__ = False  # not a pytest test class

    def __init__(self, conn: Any, name: str | None = None) -> None:
        self.conn = conn
        self.name = name or unique_name("pool")
        self.path = IMAGES_ROOT / self.name
        xml = (
            f"<pool type='dir'><name>{self.name}</name>"
            f"<target><path>{self.path}</path></target></pool>"
        )
        self.pool = conn.storagePoolDefineXML(xml, 0)
        self.pool.build(0)
        self.pool.create(0)

    def create_volume(self, name: str, size: int = 64 * MiB, fmt: str = "qcow2") -> Path:
        """A new volume; qcow2 ones get compat 1.1 (v3), which persistent bitmaps need."""
        compat = "<compat>1.1</compat>" if fmt == "qcow2" else ""
        xml = (
            f"<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity>"
            f"<target><format type='{fmt}'/>{compat}</target></volume>"
        )
        vol = self.pool.createXML(xml, 0)
        return Path(vol.path())

    def destroy(self) -> None:
        _delete_pool(self.pool)
        shutil.rmtree(self.path, ignore_errors=True)


# --------------------------------------------------------------------------- domains


@dataclass
class Disk:
    target: str  # vda, vdb, ...
    path: Path
    size: int
    fmt: str = "qcow2"
    # What the disk holds, kept by guest_write: the reference for every read-back check.
    model: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        if not self.model:
            self.model = bytearray(self.size)


def domain_xml(name: str, disks: Iterable[Disk], memory_mib: int = 64) -> str:
    disk_xml = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{d.fmt}' cache='writethrough'/>
      <source file='{d.path}'/>
      <target dev='{d.target}' bus='virtio'/>
    </disk>"""
        for d in disks
    )
    # No guest OS: SeaBIOS boots nothing and idles. type='qemu' = TCG (KVM guests did not boot
    # on these machines, DESIGN.md). No network, graphics, USB or balloon: nothing to set up.
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{disk_xml}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


def volume_domain_xml(name: str, pool: str, volume: str) -> str:
    """A guest-less domain whose one disk (vda) names `volume` of `pool` (`<disk
    type='volume'>`): no path in its XML, libvirt asks the pool."""
    return domain_xml(name, []).replace(
        "<controller type='usb'",
        f"""<disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='{pool}' volume='{volume}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb'""",
    )


def remove_domain(dom: Any, pool: TestPool, volumes: Iterable[str], workdir: Path) -> None:
    """Power a test domain off (ending any job), undefine it with its checkpoints and
    snapshots, delete its volumes and its scratch directory; whatever is already gone."""
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            with contextlib.suppress(libvirt.libvirtError):
                dom.abortJob()
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(_UNDEFINE_FLAGS())
    for name in volumes:
        with contextlib.suppress(libvirt.libvirtError):
            pool.pool.storageVolLookupByName(name).delete()
    shutil.rmtree(workdir, ignore_errors=True)


class TestDomain:
    """A persistent guest-less domain with virtio qcow2 disks in `pool`."""

    __test__ = False

    def __init__(
        self,
        conn: Any,
        pool: TestPool,
        disk_sizes: Iterable[int] = (64 * MiB,),
        name: str | None = None,
        start: bool = True,
    ) -> None:
        self.conn = conn
        self.pool = pool
        self.name = name or unique_name("dom")
        self.workdir = SCRATCH_ROOT / self.name
        self.workdir.mkdir(mode=0o750)
        qemu = pwd.getpwnam("libvirt-qemu")
        os.chown(self.workdir, qemu.pw_uid, qemu.pw_gid)
        self.disks: list[Disk] = []
        for i, size in enumerate(disk_sizes):
            target = "vd" + chr(ord("a") + i)
            path = pool.create_volume(f"{self.name}-{target}.qcow2", size)
            self.disks.append(Disk(target, path, size))
        self.dom = conn.defineXML(domain_xml(self.name, self.disks))
        self.start_seconds: float | None = None
        if start:
            self.start()

    # -- lifecycle
    def start(self) -> float:
        t0 = time.monotonic()
        self.dom.create()
        self.start_seconds = time.monotonic() - t0
        return self.start_seconds

    def stop(self) -> None:
        """Power off the way a clean shutdown would: QEMU gets SIGTERM, closes its images and
        stores persistent dirty bitmaps into the qcow2 files. (No guest OS answers ACPI, so
        `shutdown()` would hang; DESTROY_GRACEFUL never escalates to SIGKILL.)"""
        import libvirt

        if self.dom.isActive():
            self.dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)

    def kill_qemu(self) -> None:
        """Crash: SIGKILL the QEMU process, bitmaps are not stored (stay 'in-use')."""
        pid = int((Path("/run/libvirt/qemu") / f"{self.name}.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while self.dom.isActive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def reconnect(self, conn: Any) -> None:
        """Use a new connection (after a libvirtd restart the old one is dead)."""
        self.conn = conn
        self.dom = conn.lookupByName(self.name)

    def destroy(self) -> None:
        remove_domain(self.dom, self.pool, [d.path.name for d in self.disks], self.workdir)

    def disk(self, target: str) -> Disk:
        return next(d for d in self.disks if d.target == target)

    # -- monitor
    def hmp(self, command: str) -> str:
        import libvirt_qemu

        return str(
            libvirt_qemu.qemuMonitorCommand(
                self.dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            )
        )

    def qmp(self, command: str, **arguments: Any) -> Any:
        import json

        import libvirt_qemu

        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(self.dom, json.dumps(msg), 0))
        if "error" in reply:
            raise RuntimeError(f"QMP {command}: {reply['error']}")
        return reply["return"]

    def qdev_path(self, target: str) -> str:
        """QOM path of the virtio-blk device behind `target`, as qemu-io -d wants it.

        The alias libvirt gives the disk (virtio-disk0, ...) names the virtio-blk-pci *proxy*;
        its block backend hangs off the child `virtio-backend`."""
        root = ET.fromstring(self.dom.XMLDesc(0))
        for disk in root.iterfind("./devices/disk"):
            t = disk.find("target")
            if t is not None and t.get("dev") == target:
                alias = disk.find("alias")
                if alias is None:
                    raise RuntimeError(f"{target} has no alias: is the domain running?")
                return f"/machine/peripheral/{alias.get('name')}/virtio-backend"
        raise KeyError(target)

    def node_name(self, target: str) -> str:
        """The qcow2 (format) block node behind `target` (libvirt-N-format)."""
        for dev in self.qmp("query-block"):
            if dev.get("qdev") == self.qdev_path(target):
                return str(dev["inserted"]["node-name"])
        raise KeyError(target)

    def bitmaps(self, target: str) -> dict[str, dict[str, Any]]:
        """The live dirty bitmaps of `target`'s qcow2 node, by name."""
        for dev in self.qmp("query-block"):
            if dev.get("qdev") == self.qdev_path(target):
                return {b["name"]: b for b in dev.get("inserted", {}).get("dirty-bitmaps", [])}
        raise KeyError(target)

    def _log_size(self) -> int:
        try:
            return (QEMU_LOG_DIR / f"{self.name}.log").stat().st_size
        except FileNotFoundError:
            return 0

    def _await_log(self, start: int, needle: str, timeout: float = 10.0) -> None:
        """qemu-io prints to QEMU's stdout, which virtlogd writes to the domain log; the
        monitor command itself returns an empty string even when the write failed."""
        log = QEMU_LOG_DIR / f"{self.name}.log"
        deadline = time.monotonic() + timeout
        while True:
            with log.open("rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            if needle in text:
                return
            for bad in ("failed", "Error", "error"):
                if bad in text:
                    raise RuntimeError(f"qemu-io: {text.strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"qemu-io gave no {needle!r} in the domain log: {text!r}")
            time.sleep(0.02)

    def guest_write(self, target: str, offset: int, data: bytes | int, length: int = 0) -> None:
        """Write through the running VM's block layer (tracked by dirty bitmaps, like a guest).

        `data` is either bytes, or an int pattern byte repeated `length` times."""
        disk = self.disk(target)
        if isinstance(data, int):
            payload = bytes([data]) * length
            cmd = f"write -P {data:#x} {offset} {length}"
        else:
            payload = data
            length = len(data)
            src = self.workdir / f"qemu-io-{secrets.token_hex(4)}.bin"
            src.write_bytes(data)
            src.chmod(0o644)
            cmd = f"write -s {src} {offset} {length}"
        if offset < 0 or offset + length > disk.size or length <= 0:
            raise ValueError(f"write {offset}+{length} outside {target} ({disk.size})")
        start = self._log_size()
        try:
            out = self.hmp(f'qemu-io -d {self.qdev_path(target)} "{cmd}"')
            if out.strip():
                raise RuntimeError(f"qemu-io: {out.strip()}")
            self._await_log(start, f"wrote {length}/{length} bytes at offset {offset}")
        finally:
            if not isinstance(data, int):
                src.unlink(missing_ok=True)
        disk.model[offset : offset + length] = payload


def dirty_ranges(
    writes: Iterable[tuple[int, int]], granularity: int = DEFAULT_GRANULARITY
) -> list[tuple[int, int]]:
    """(offset, length) writes -> merged, granularity-aligned (offset, length) ranges."""
    chunks = sorted(
        {
            c
            for off, ln in writes
            for c in range(off // granularity, (off + ln - 1) // granularity + 1)
        }
    )
    out: list[tuple[int, int]] = []
    for c in chunks:
        if out and out[-1][0] + out[-1][1] == c * granularity:
            out[-1] = (out[-1][0], out[-1][1] + granularity)
        else:
            out.append((c * granularity, granularity))
    return out


# --------------------------------------------------------------------------- backup jobs


def checkpoint_xml(name: str, targets: Iterable[str], description: str = "") -> str:
    disks = "".join(f"<disk name='{t}' checkpoint='bitmap'/>" for t in targets)
    desc = f"<description>{description}</description>" if description else ""
    return f"<domaincheckpoint><name>{name}</name>{desc}<disks>{disks}</disks></domaincheckpoint>"


def backup_xml(
    socket: Path, scratch_dir: Path, targets: Iterable[str], incremental: str | None = None
) -> str:
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    disks = "".join(
        f"<disk name='{t}' backup='yes' type='file'>"
        f"<scratch file='{scratch_dir / f'scratch-{t}.qcow2'}'/></disk>"
        for t in targets
    )
    return (
        f"<domainbackup mode='pull'>{inc}"
        f"<server transport='unix' socket='{socket}'/><disks>{disks}</disks></domainbackup>"
    )


@dataclass
class PullBackup:
    domain: TestDomain
    socket: Path
    exports: dict[str, str]  # target -> NBD export name
    bitmaps: dict[str, str]  # target -> dirty bitmap exported (incremental only)
    scratch: dict[str, Path]
    xml: str
    begin_seconds: float

    def context(self, target: str) -> str:
        return f"qemu:dirty-bitmap:{self.bitmaps[target]}"

    def connect(self, target: str, dirty: bool = False) -> Any:
        contexts = ["base:allocation"] + ([self.context(target)] if dirty else [])
        return nbd_connect(self.socket, self.exports[target], contexts)

    def end(self, timeout: float = 15.0) -> None:
        """Abort (= finish) the pull job and wait until libvirt has torn it down."""
        import libvirt

        with contextlib.suppress(libvirt.libvirtError):
            self.domain.dom.abortJob()
        wait_no_job(self.domain.dom, timeout)
        # Scratch files are removed by libvirt asynchronously after the job ends.
        deadline = time.monotonic() + timeout
        while any(p.exists() for p in self.scratch.values()) and time.monotonic() < deadline:
            time.sleep(0.05)


def job_active(dom: Any) -> bool:
    import libvirt

    try:
        return bool(dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:
        return False


def wait_no_job(dom: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while job_active(dom):
        if time.monotonic() > deadline:
            raise TimeoutError("backup job still active")
        time.sleep(0.05)


def begin_pull_backup(
    domain: TestDomain,
    checkpoint: str | None = None,
    incremental: str | None = None,
    targets: Iterable[str] | None = None,
) -> PullBackup:
    """Start a pull-mode backup (optionally incremental and/or creating a checkpoint)."""
    tg = list(targets) if targets is not None else [d.target for d in domain.disks]
    socket = domain.workdir / "nbd.sock"
    bxml = backup_xml(socket, domain.workdir, tg, incremental)
    cxml = checkpoint_xml(checkpoint, tg) if checkpoint else None
    t0 = time.monotonic()
    domain.dom.backupBegin(bxml, cxml, 0)
    took = time.monotonic() - t0
    desc = domain.dom.backupGetXMLDesc(0)
    root = ET.fromstring(desc)
    exports: dict[str, str] = {}
    bitmaps: dict[str, str] = {}
    scratch: dict[str, Path] = {}
    for d in root.iterfind("./disks/disk"):
        if d.get("backup") != "yes":
            continue
        name = d.get("name", "")
        exports[name] = d.get("exportname", name)
        if d.get("exportbitmap"):
            bitmaps[name] = d.get("exportbitmap", "")
        s = d.find("scratch")
        if s is not None and s.get("file"):
            scratch[name] = Path(s.get("file", ""))
    return PullBackup(domain, socket, exports, bitmaps, scratch, desc, took)


# --------------------------------------------------------------------------- NBD


def nbd_connect(socket: Path, export: str, contexts: Iterable[str] = ("base:allocation",)) -> Any:
    import nbd

    h = nbd.NBD()
    h.set_export_name(export)
    for c in contexts:
        h.add_meta_context(c)
    h.connect_unix(str(socket))
    return h


def nbd_extents(
    h: Any, context: str, size: int | None = None, step: int = 1 << 30
) -> list[tuple[int, int, int]]:
    """All (offset, length, flags) extents of `context` over the export, merged when adjacent
    extents have the same flags."""
    size = h.get_size() if size is None else size
    out: list[tuple[int, int, int]] = []
    got: list[int] = []

    def cb(metacontext: str, off: int, entries: list[int], err: Any) -> int:
        # Called under the handle's lock: collect only, no nbd_* calls in here.
        if metacontext == context:
            got.extend(entries)
        return 0

    offset = 0
    while offset < size:
        got.clear()
        h.block_status(min(step, size - offset), offset, cb)
        if not got:
            raise RuntimeError(f"server returned no {context} extents at {offset}")
        pos = offset
        for i in range(0, len(got), 2):
            length, flags = got[i], got[i + 1]
            length = min(length, size - pos)
            if length <= 0:
                break
            if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + length, flags)
            else:
                out.append((pos, length, flags))
            pos += length
        offset = pos
    return out


def data_extents(h: Any) -> list[tuple[int, int]]:
    """base:allocation extents that hold data (not reported as zero)."""
    import nbd

    return [(o, n) for o, n, f in nbd_extents(h, "base:allocation") if not f & nbd.STATE_ZERO]


def dirty_extents(h: Any, context: str) -> list[tuple[int, int]]:
    """qemu:dirty-bitmap:* extents with the dirty bit (flag 1) set."""
    return [(o, n) for o, n, f in nbd_extents(h, context) if f & 1]


def nbd_read(h: Any, ranges: Iterable[tuple[int, int]], chunk: int = 4 * MiB) -> Iterator[bytes]:
    for off, ln in ranges:
        pos = off
        while pos < off + ln:
            n = min(chunk, off + ln - pos)
            yield h.pread(n, pos)
            pos += n


def nbd_read_all(h: Any, chunk: int = 4 * MiB) -> bytes:
    return b"".join(nbd_read(h, [(0, h.get_size())], chunk))


def sha256(b: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------- offline tools


def qemu_img_info(path: Path, force_share: bool = False) -> dict[str, Any]:
    import json

    cmd = ["qemu-img", "info", "--output=json"] + (["-U"] if force_share else []) + [str(path)]
    return dict(json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout))


def qemu_img_map(path: Path, force_share: bool = False) -> list[dict[str, Any]]:
    import json

    cmd = ["qemu-img", "map", "--output=json"] + (["-U"] if force_share else []) + [str(path)]
    return list(json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout))


def qemu_img_raw(path: Path, dest: Path, force_share: bool = False) -> bytes:
    cmd = ["qemu-img", "convert", "-O", "raw"] + (["-U"] if force_share else [])
    subprocess.run([*cmd, str(path), str(dest)], check=True, capture_output=True)
    return dest.read_bytes()


@contextlib.contextmanager
def qemu_nbd(
    image: Path, socket: Path, bitmap: str | None = None, read_only: bool = True
) -> Iterator[Path]:
    """Serve an image (VM shut off) over NBD on a unix socket, optionally with a persistent
    bitmap as the `qemu:dirty-bitmap:<bitmap>` meta context. Export name: ''."""
    cmd = ["qemu-nbd", "-f", "qcow2", "-k", str(socket), "--persistent", "--shared=4"]
    if read_only:
        cmd.append("-r")
    if bitmap:
        cmd += ["--bitmap", bitmap]
    proc = subprocess.Popen([*cmd, str(image)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"qemu-nbd exited {proc.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not create its socket")
            time.sleep(0.02)
        yield socket
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
        socket.unlink(missing_ok=True)
