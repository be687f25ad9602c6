"""A tiny real Linux guest with the QEMU guest agent, for the freeze/thaw tests.

Debian's cloud kernel is booted directly (<os><kernel>/<initrd>) under TCG. The initramfs is
built here: busybox (static) as /init, the virtio modules from the same kernel .deb, and
`qemu-ga` from Debian's qemu-guest-agent .deb with the shared libraries it links taken from
this host (the same Debian release). Its /init mounts /dev/vda (ext4, made on the host with
mkfs.ext4 and copied into a qcow2 v3 volume), starts qemu-ga on the virtio-serial port
org.qemu.guest_agent.0 with a freeze hook, and writes a numbered file into /mnt every 0.2 s
(with sync), printing `VMKEEP-WROTE n` on the serial console after each one. qemu-ga is
started again a second after it exits.

Nothing is installed on this machine: the .debs are fetched with `apt-get download` into
/var/cache/vmkeep-tests/debs (scripts/install-libvirt.sh does it ahead, or this module does)
and extracted with `dpkg-deb -x`. The kernel + initramfs pair is cached under
/var/cache/vmkeep-tests/guest-<key>, the key naming the .debs and this file's guest scripts,
so a machine builds it once.

The freeze hook prints `VMKEEP-HOOK freeze|thaw` on the console (qemu-ga runs it before the
FIFREEZE ioctls and after the thaw), and sleeps `/run/hook-delay` seconds before a freeze when
that file exists: a slow hook, as a database flush script can be.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.libvirt import libvirt_env as lv

CACHE = Path(os.environ.get("VMKEEP_TEST_CACHE", "/var/cache/vmkeep-tests"))
DEBS = CACHE / "debs"
KERNEL_META = "linux-image-cloud-amd64"
PACKAGES = ("busybox-static", "qemu-guest-agent")
# Load order: each module after the ones it depends on (checked against .modinfo below).
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
)
CMDLINE = "console=ttyS0 quiet panic=-1"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /run /tmp /mnt /var/run
for m in MODULES; do insmod /lib/modules/$m.ko || echo "VMKEEP-ERROR insmod $m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 /dev/vda /mnt || echo "VMKEEP-ERROR mount /dev/vda"
port=""
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] && [ "$(cat $p/name)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
  done
  [ -z "$port" ] && sleep 0.1
  i=$((i+1))
done
[ -n "$port" ] || echo "VMKEEP-ERROR no org.qemu.guest_agent.0 port"
# Restarted when it exits: a test kills it through itself (guest-exec) and wants it back.
while true; do
  qemu-ga -m virtio-serial -p "$port" -t /run --fsfreeze-hook=/etc/fsfreeze-hook -l /dev/console
  echo "VMKEEP-GA-EXIT $?"
  sleep 1
done &
echo "VMKEEP-READY"
n=0
while true; do
  n=$((n+1))
  echo "vmkeep guest file $n" > /mnt/f$n
  sync
  echo "VMKEEP-WROTE $n"
  sleep 0.2
done
""".replace("MODULES", " ".join(MODULES))

HOOK = r"""#!/bin/sh
if [ "$1" = freeze ] && [ -e /run/hook-delay ]; then sleep "$(cat /run/hook-delay)"; fi
echo "VMKEEP-HOOK $1" > /dev/console
exit 0
"""


class GuestUnavailable(Exception):
    """The guest's parts cannot be had here; the message says why."""


@dataclass(frozen=True)
class GuestFiles:
    kernel: Path
    initrd: Path


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise GuestUnavailable(f"{' '.join(cmd)} failed: {(res.stderr or res.stdout).strip()}")
    return res.stdout


def _kernel_package() -> str:
    """The versioned kernel package the meta package depends on (its .deb has the kernel)."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    for m in re.finditer(r"Depends: (linux-image-\S+)", out):
        return m.group(1)
    raise GuestUnavailable(f"apt-cache knows no kernel behind {KERNEL_META} (apt-get update?)")


def _find_deb(package: str) -> Path | None:
    found = sorted(DEBS.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def fetch_debs() -> list[Path]:
    """The kernel, busybox-static and qemu-guest-agent .debs, downloaded when missing."""
    DEBS.mkdir(parents=True, exist_ok=True)
    kernel = sorted(DEBS.glob("linux-image-*-amd64_*.deb"))
    wanted = [] if kernel else [_kernel_package()]
    wanted += [p for p in PACKAGES if _find_deb(p) is None]
    if wanted:
        _run(["apt-get", "download", *wanted], cwd=DEBS)
        kernel = sorted(DEBS.glob("linux-image-*-amd64_*.deb"))
    if not kernel:
        raise GuestUnavailable(f"no kernel .deb in {DEBS}")
    debs = [kernel[-1]]
    for p in PACKAGES:
        deb = _find_deb(p)
        if deb is None:
            raise GuestUnavailable(f"no {p} .deb in {DEBS}")
        debs.append(deb)
    return debs


class Cpio:
    """An initramfs archive in the `newc` format the kernel unpacks."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        self.buf.write(header + name.encode() + b"\0")
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        """`name` and its parents, each once."""
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in self.dirs:
                self.dirs.add(sub)
                self._entry(sub, 0o040755, b"")

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, 0o100000 | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self.buf.getvalue()


def _module_depends(ko: Path) -> list[str]:
    m = re.search(rb"\x00depends=([^\x00]*)", ko.read_bytes())
    return [d for d in (m.group(1).decode().split(",") if m else []) if d]


def _libraries(binary: Path) -> list[Path]:
    """The host's shared libraries `binary` links (ldd), the loader included."""
    out = _run(["ldd", str(binary)])
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _build(debs: list[Path], out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        root = Path(tmp) / "x"
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise GuestUnavailable(f"no vmlinuz in {debs[0].name}")
        moddir = next((root / "lib" / "modules").iterdir())
        kos = {p.stem: p for p in moddir.rglob("*.ko")}
        cpio = Cpio()
        for d in ("bin", "dev", "proc", "sys", "run", "tmp", "mnt", "etc", "lib/modules"):
            cpio.dir(d)
        loaded: list[str] = []
        for name in MODULES:
            ko = kos.get(name)
            if ko is None:
                raise GuestUnavailable(f"module {name} missing from {debs[0].name}")
            late = [d for d in _module_depends(ko) if d not in loaded]
            if late:
                raise GuestUnavailable(f"module {name} needs {late} loaded first")
            loaded.append(name)
            cpio.file(f"lib/modules/{name}.ko", ko.read_bytes())
        cpio.file("bin/busybox", (root / "bin" / "busybox").read_bytes(), 0o755)
        ga = root / "usr" / "sbin" / "qemu-ga"
        cpio.file("usr/sbin/qemu-ga", ga.read_bytes(), 0o755)
        for lib in _libraries(ga):
            cpio.file(str(lib).lstrip("/"), lib.resolve().read_bytes(), 0o755)
        cpio.file("etc/fsfreeze-hook", HOOK.encode(), 0o755)
        cpio.file("init", INIT.encode(), 0o755)
        shutil.copyfile(kernels[-1], Path(tmp) / "vmlinuz")
        (Path(tmp) / "initrd.gz").write_bytes(gzip.compress(cpio.finish(), 6))
        stage = Path(tmp) / "out"
        stage.mkdir()
        for f in ("vmlinuz", "initrd.gz"):
            os.replace(Path(tmp) / f, stage / f)
            (stage / f).chmod(0o644)
        stage.chmod(0o755)
        try:
            os.rename(stage, out)
        except OSError:
            if not (out / "initrd.gz").exists():  # another process built it meanwhile: fine
                raise


def guest_files() -> GuestFiles:
    """The kernel and initramfs, built once per set of .debs and guest scripts."""
    if os.geteuid() != 0:
        raise GuestUnavailable("building the guest needs root (apt-get download, dpkg-deb)")
    for tool in ("apt-get", "dpkg-deb", "ldd", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise GuestUnavailable(f"{tool} not found")
    debs = fetch_debs()
    recipe = "\n".join([*(d.name for d in debs), INIT, HOOK, CMDLINE])
    out = CACHE / f"guest-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    if not (out / "initrd.gz").exists():
        _build(debs, out)
    return GuestFiles(out / "vmlinuz", out / "initrd.gz")


def make_ext4_qcow2(target: Path, size: int, seed: dict[str, bytes]) -> None:
    """An ext4 file system (with `seed` files in its root) written into the existing qcow2
    volume `target` (created by the pool as compat 1.1 so it can hold dirty bitmaps)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        for name, data in seed.items():
            (tree / name).write_bytes(data)
        raw = Path(tmp) / "fs.raw"
        with raw.open("wb") as f:
            f.truncate(size)
        _run(["mkfs.ext4", "-q", "-F", "-L", "vmkeep-guest", "-d", str(tree), str(raw)])
        _run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(target)])


def guest_xml(name: str, workdir: Path, disk: Path, memory_mib: int = 256) -> str:
    """Direct kernel boot, one virtio ext4 disk, the console in a file, a guest agent channel
    (libvirt picks the host socket path), and nothing else."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{workdir / "vmlinuz"}</kernel>
    <initrd>{workdir / "initrd.gz"}</initrd>
    <cmdline>{CMDLINE}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{workdir / "console.log"}'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


class RealGuest:
    """A running guest of the kind above in `pool`, with its own run directory (kernel,
    initramfs and console log); `destroy` removes domain, volume and directory."""

    def __init__(self, conn: Any, pool: lv.TestPool, files: GuestFiles, size: int) -> None:
        self.conn = conn
        self.pool = pool
        self.name = lv.unique_name("guest")
        self.workdir = lv.SCRATCH_ROOT / self.name
        self.workdir.mkdir(mode=0o750)
        qemu = pwd.getpwnam("libvirt-qemu")
        os.chown(self.workdir, qemu.pw_uid, qemu.pw_gid)
        for f in (files.kernel, files.initrd):  # libvirt relabels them: not the cached copies
            shutil.copyfile(f, self.workdir / f.name)
        self.console = self.workdir / "console.log"
        self.size = size
        self.disk = pool.create_volume(f"{self.name}-vda.qcow2", size)
        make_ext4_qcow2(self.disk, size, {"seed.txt": b"made on the host\n"})
        self.dom = conn.defineXML(guest_xml(self.name, self.workdir, self.disk))
        self.dom.create()

    def agent(self, command: str, timeout: int = 10, **arguments: Any) -> Any:
        """One guest agent command through libvirt (QMP-style JSON), its `return` value."""
        import libvirt_qemu

        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        reply = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(msg), timeout, 0)
        return json.loads(reply).get("return")

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wrote(self) -> int:
        """The number of the last file the guest wrote and synced."""
        found = re.findall(r"VMKEEP-WROTE (\d+)", self.console_text())
        return int(found[-1]) if found else 0

    def hooks(self) -> list[str]:
        """The freeze hook's calls so far, in order ('freeze', 'thaw')."""
        return re.findall(r"VMKEEP-HOOK (\w+)", self.console_text())

    def wait_ready(self, timeout: float) -> float:
        """Seconds until the agent answers guest-ping and the guest writes files."""
        import libvirt

        t0 = time.monotonic()
        while True:
            try:
                self.agent("guest-ping", timeout=2)
                if self.wrote() > 0:
                    return time.monotonic() - t0
            except libvirt.libvirtError:
                pass
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(
                    f"guest agent of {self.name} did not answer within {timeout:.0f} s; "
                    f"console:\n{self.console_text()[-3000:]}"
                )
            time.sleep(0.5)

    def wait_hooks(self, count: int, timeout: float = 10.0) -> list[str]:
        """The hook calls once there are at least `count` (the console file lags a little)."""
        deadline = time.monotonic() + timeout
        while len(self.hooks()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.hooks()

    def wait_written(self, more: int, timeout: float = 30.0) -> int:
        """Wait until the guest has written `more` files beyond what it had; the last number."""
        start = self.wrote()
        deadline = time.monotonic() + timeout
        while self.wrote() < start + more:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the guest wrote no new file in {timeout:.0f} s")
            time.sleep(0.1)
        return self.wrote()

    def destroy(self) -> None:
        lv.remove_domain(self.dom, self.pool, [self.disk.name], self.workdir)
