"""The benchmark's guest-less domains (bench/libvirt_live.py): defined and started on a qcow2
image, removed with their checkpoints; guest writes through the running VM's block layer."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

QEMU_LOG = Path("/var/log/libvirt/qemu")
URI = "qemu:///system"


def domain_xml(name: str, image: Path) -> str:
    return f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{image}'/><target dev='vda' bus='virtio'/></disk>
    <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>"""


@contextmanager
def running_domain(name: str, image: Path) -> Iterator[Any]:
    """A started guest-less domain; destroyed and undefined (with checkpoints) on exit."""
    import libvirt

    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open(URI)
    try:
        dom = conn.defineXML(domain_xml(name, image))
        dom.create()
        yield dom
    finally:
        remove_domain(name)
        with suppress(libvirt.libvirtError):
            conn.close()


def remove_domain(name: str) -> None:
    """On a fresh connection: the first one may have died with a libvirtd restart."""
    import libvirt

    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(name)
        with suppress(libvirt.libvirtError):
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


def guest_writes(dom: Any, offsets: list[int], block: int) -> float:
    """Rewrite `block` bytes at each offset through the VM's virtio-blk device (qemu-io in the
    QEMU monitor; it prints to the domain log, which is awaited). Returns the seconds taken."""
    import libvirt_qemu

    alias = ET.fromstring(dom.XMLDesc(0)).find("./devices/disk/alias")
    device = f"/machine/peripheral/{alias.get('name') if alias is not None else ''}/virtio-backend"
    log = QEMU_LOG / f"{dom.name()}.log"
    done = f"wrote {block}/{block} bytes".encode()
    before, before_done = log.read_bytes().count(b"wrote "), log.read_bytes().count(done)
    began = time.perf_counter()
    for i, off in enumerate(offsets):
        command = f'qemu-io -d {device} "write -P {1 + i % 254:#x} {off} {block}"'
        libvirt_qemu.qemuMonitorCommand(
            dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
    deadline = time.monotonic() + 60
    while log.read_bytes().count(done) - before_done < len(offsets):  # this call's writes
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest writes did not all complete (see {log})")
        time.sleep(0.05)
    if log.read_bytes().count(b"wrote ") - before != len(offsets):
        raise RuntimeError(f"unexpected qemu-io output in {log}")
    return time.perf_counter() - began
