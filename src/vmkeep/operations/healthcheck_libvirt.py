"""The libvirt health check: restore a point as a throw-away domain with no network, start it,
wait until it runs and (when it has a guest agent channel) until its agent answers
`guest-ping`, then destroy and undefine it and delete its volumes, whatever happened.

Everything it creates is named `vmkeep-hc-<pid>-<random>`: a check that was killed leaves
objects whose pid no longer runs, and the next check removes them before it starts. (Several
vmkeep hosts sharing one hypervisor could mistake each other's pids: give them separate pools.)
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import secrets
import time
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

from vmkeep.connectors.base import VmConfig, VmSink
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.domxml import DOMAIN_XML_KEY, parse_disks
from vmkeep.connectors.libvirt.restore.new_domain import lookup_pool
from vmkeep.errors import ConnectorError, IntegrityError, VmkeepError
from vmkeep.operations.healthcheck_model import PREFIX, DiskTracker, HealthOptions, HealthResult
from vmkeep.progress import Progress

if TYPE_CHECKING:
    from vmkeep.repository.manifest import Manifest
    from vmkeep.repository.repository import Repository

AGENT_CHANNEL = "org.qemu.guest_agent.0"
NAME_RE = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+(?:$|-)")
SETTLE = 5.0  # a domain without agent must keep running this long (bounded by the timeout)
POLL = 0.5
CHARDEVS = ("serial", "console", "parallel", "channel")


def throwaway_xml(xml: str) -> str:
    """The recorded domain XML without what a second copy of the VM must not share with the
    original: no network interfaces or passed-through host devices, character devices that
    wrote to the original's files become ptys, an agent socket path and fixed display ports
    are left for libvirt to choose."""
    root = ET.fromstring(xml)
    devices = root.find("devices")
    if devices is None:
        return xml
    for el in list(devices):
        if el.tag in ("interface", "hostdev"):
            devices.remove(el)
        elif el.tag in CHARDEVS:
            _private_chardev(el)
        elif el.tag == "graphics":
            for attr in ("port", "tlsPort", "websocket"):
                el.attrib.pop(attr, None)
            if el.get("type") in ("vnc", "spice"):
                el.set("autoport", "yes")
    return ET.tostring(root, encoding="unicode")


def _private_chardev(el: ET.Element) -> None:
    for child in list(el):
        if child.tag == "log":
            el.remove(child)
    if el.get("type") == "file":
        el.set("type", "pty")
        for child in list(el):
            if child.tag == "source":
                el.remove(child)
    elif el.get("type") == "unix":
        for child in list(el):
            if child.tag == "source":  # libvirt makes a path of the new domain's own
                el.remove(child)
    target = el.find("target")
    if target is not None:
        target.attrib.pop("state", None)


def has_agent_channel(xml: str) -> bool:
    """The domain is configured with a guest agent channel (connected or not)."""
    root = ET.fromstring(xml)
    return any(t.get("name") == AGENT_CHANNEL for t in root.iterfind("./devices/channel/target"))


class ThrowawayConnector(LibvirtConnector):
    """Restores through the libvirt connector, with the domain XML made throw-away first."""

    def create_vm(self, config: VmConfig, target: str) -> VmSink:
        xml = config.metadata.get(DOMAIN_XML_KEY)
        if isinstance(xml, str):
            try:
                config.metadata[DOMAIN_XML_KEY] = throwaway_xml(xml)
            except ET.ParseError as exc:
                raise ConnectorError(f"the recorded domain XML is invalid: {exc}") from None
        return super().create_vm(config, target)

    @property
    def connection(self) -> Connection:
        return self._conn


def check_libvirt(
    repo: Repository, manifest: Manifest, options: HealthOptions, progress: Progress
) -> HealthResult:
    from vmkeep.operations.restore import restore_vm

    began = time.monotonic()
    result = HealthResult(manifest.id, manifest.vm_name, "libvirt")
    if not (manifest.vm.get("metadata") or {}).get(DOMAIN_XML_KEY):
        raise ConnectorError(
            f"restore point {manifest.id} was not taken from libvirt (no domain XML): "
            "check it with --connector files"
        )
    target = ThrowawayConnector(options.uri)
    conn = target.connection
    try:
        lookup_pool(conn.ensure(), options.pool)  # a bad --pool is bad input: before anything
        result.notes += clean_stale(conn, options.pool)
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        progress.note(f"restoring {manifest.id} as throw-away domain {name} (no network)")
        try:
            tracker = DiskTracker(progress, manifest.vm_name)
            try:
                restore_vm(repo, target, manifest.id, options.pool, tracker, name=name)
            except VmkeepError as exc:
                where = f" (disk {tracker.disk})" if tracker.disk else ""
                corrupt = isinstance(exc, IntegrityError)
                result.fail(f"restore failed{where}: {exc.message}", corrupt=corrupt)
                result.disk = tracker.disk
            else:
                result.durations["restore"] = time.monotonic() - began
                boot(conn, name, options.timeout, result, progress)
        finally:
            t0 = time.monotonic()
            result.notes += remove_domain(conn, name, options.pool)
            result.durations["cleanup"] = time.monotonic() - t0
    finally:
        target.close()
    result.durations["total"] = time.monotonic() - began
    return result


def boot(
    conn: Connection, name: str, timeout: float, result: HealthResult, progress: Progress
) -> None:
    """Start the domain and watch it: running, then agent answered (or SETTLE s up)."""
    lv = libvirt()
    t0 = time.monotonic()
    deadline = t0 + timeout
    dom = conn.lookup(name)
    try:
        dom.create()
    except lv.libvirtError as exc:
        result.fail(f"the domain did not start: {one_line(exc)}")
        return
    result.durations["start"] = time.monotonic() - t0
    xml = str(dom.XMLDesc(0))
    t1 = time.monotonic()
    if not has_agent_channel(xml):
        result.agent = "absent"
        progress.note("no guest agent channel: checking that the domain keeps running")
        until = min(deadline, t1 + SETTLE)
        while time.monotonic() < until:
            if not running(dom, result):
                return
            time.sleep(POLL)
        result.durations["running"] = time.monotonic() - t1
        return
    progress.note(f"{name} runs: waiting for its guest agent (up to {timeout:.0f} s)")
    last = ""
    while time.monotonic() < deadline:
        if not running(dom, result):
            return
        try:
            agent_ping(dom)
        except lv.libvirtError as exc:
            last = one_line(exc)
            time.sleep(POLL)
            continue
        result.agent = "answered"
        result.durations["agent"] = time.monotonic() - t1
        return
    result.agent = "timeout"
    result.fail(f"the guest agent did not answer within {timeout:.0f} s ({last or 'no answer'})")


def running(dom: Any, result: HealthResult) -> bool:
    """True while the domain runs; else the result fails with the state it went to."""
    lv = libvirt()
    try:
        state = int(dom.state()[0])
    except lv.libvirtError as exc:
        result.fail(f"the domain went away: {one_line(exc)}")
        return False
    if state in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_BLOCKED):
        return True
    words = {lv.VIR_DOMAIN_SHUTOFF: "stopped", lv.VIR_DOMAIN_CRASHED: "crashed"}
    result.fail(f"the domain {words.get(state, f'went to state {state}')} while booting")
    return False


def agent_ping(dom: Any, timeout: int = 2) -> None:
    """One `guest-ping` through libvirt; raises libvirtError when the agent does not answer."""
    try:
        qemu = importlib.import_module("libvirt_qemu")
    except ImportError:
        raise ConnectorError("the Python module 'libvirt_qemu' is missing") from None
    qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-ping"}), timeout, 0)


def _undefine_flags() -> int:
    lv = libvirt()
    names = (
        "VIR_DOMAIN_UNDEFINE_NVRAM",
        "VIR_DOMAIN_UNDEFINE_MANAGED_SAVE",
        "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA",
        "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA",
    )
    return sum(int(getattr(lv, n, 0)) for n in names)


def remove_domain(conn: Connection, name: str, pool: str) -> list[str]:
    """Destroy and undefine domain `name` and delete its volumes (any pool) and the volumes
    named after it in `pool`; what could not be removed is said (the next check retries)."""
    lv = libvirt()
    notes: list[str] = []
    paths: list[str] = []
    c = conn.ensure()
    try:
        dom = c.lookupByName(name)
    except lv.libvirtError:
        dom = None
    if dom is not None:
        with contextlib.suppress(lv.libvirtError, ConnectorError):
            paths = [d.source for d in parse_disks(str(dom.XMLDesc(0))) if d.source]
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(_undefine_flags())
        except lv.libvirtError as exc:
            notes.append(f"could not remove domain {name}: {one_line(exc)}")
    for path in paths:
        with contextlib.suppress(lv.libvirtError):
            c.storageVolLookupByPath(path).delete(0)
    with contextlib.suppress(lv.libvirtError, ConnectorError):
        p = lookup_pool(c, pool)
        p.refresh(0)
        for vol in p.listAllVolumes(0):
            if vol.name().startswith(f"{name}-"):
                try:
                    vol.delete(0)
                except lv.libvirtError as exc:
                    notes.append(f"could not delete volume {vol.name()}: {one_line(exc)}")
    return notes


def _stale(name: str) -> bool:
    """A vmkeep-hc-<pid>-* name whose process is gone (never this process's)."""
    m = NAME_RE.match(name)
    if m is None:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clean_stale(conn: Connection, pool: str) -> list[str]:
    """Remove the domains and volumes (in `pool`) of health checks that were killed."""
    lv = libvirt()
    notes = []
    c = conn.ensure()
    for dom in c.listAllDomains(0):
        if _stale(dom.name()):
            notes += remove_domain(conn, dom.name(), pool)
            notes.append(f"removed domain {dom.name()}, left by a health check that was killed")
    with contextlib.suppress(lv.libvirtError, ConnectorError):
        p = lookup_pool(c, pool)
        p.refresh(0)
        for vol in p.listAllVolumes(0):
            if _stale(vol.name()):
                with contextlib.suppress(lv.libvirtError):
                    vol.delete(0)
                    notes.append(f"removed volume {vol.name()}, left by a killed health check")
    return notes
