"""Finding an instant restore that a dead vmkeep left unfinished, so a rerun can finish it.

Such a domain's volumes still name vmkeep's export as their backing file:
`nbd+unix:///<point id>/<disk>?socket=/var/lib/libvirt/qemu/vmkeep-<hex>/disk<N>.sock`. The
point id in the export name ties the volume to the point it must be finished from: serving
another point's data under it would mix two disks. Guest writes made meanwhile are in the
volumes; the block-stream job copies only what they do not hold yet, so nothing is lost."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkeep.connectors.libvirt.backup.workdir import is_workdir
from vmkeep.connectors.libvirt.bindings import libvirt
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.errors import ConnectorError, NotFoundError, UsageError
from vmkeep.repository.manifest import Manifest

BACKING = re.compile(r"nbd\+unix:///(?P<export>[^?]+)\?socket=(?P<socket>/[^&]+)")
SOCKET_NAME = re.compile(r"disk[0-9]{1,4}\.sock")


@dataclass
class Unfinished:
    """Disk name -> (volume path, socket path) of the disks still on the export."""

    dom: Any
    disks: dict[str, tuple[Path, Path]]

    @property
    def workdir(self) -> Path:
        return next(iter(self.disks.values()))[1].parent


def export_name(point_id: str, disk: str) -> str:
    return f"{point_id}/{disk}"


def find_unfinished(conn: Connection, name: str, manifest: Manifest) -> Unfinished | None:
    """The domain `name` when it is an unfinished instant restore of this point; None when
    there is no such domain or it is not one (a finished one included)."""
    try:
        dom = conn.lookup(name)
    except NotFoundError:
        return None
    root = ET.fromstring(dom.XMLDesc(libvirt().VIR_DOMAIN_XML_INACTIVE))
    sources: dict[str, str] = {}
    for disk in root.iterfind("./devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None and source is not None and source.get("file"):
            sources[target.get("dev", "")] = source.get("file", "")
    disks: dict[str, tuple[Path, Path]] = {}
    for index in manifest.disks:
        path = sources.get(index.name)
        backing = _backing_file(path) if path else None
        if backing is None:
            continue
        match = BACKING.fullmatch(backing)
        if match is None:
            return None  # backed by something else: not ours to touch
        if match["export"] != export_name(manifest.id, index.name):
            raise UsageError(
                f"domain {name} is an unfinished instant restore of another point "
                f"({match['export'].split('/')[0]}): rerun with that point"
            )
        sock = Path(match["socket"])
        if not is_workdir(sock.parent) or not SOCKET_NAME.fullmatch(sock.name):
            raise UsageError(f"domain {name}: its backing socket {sock} is not vmkeep's")
        disks[index.name] = (Path(str(path)), sock)
    if not disks:
        return None
    if len({sock.parent for _, sock in disks.values()}) != 1:
        raise UsageError(f"domain {name}: its disks name several vmkeep run directories")
    found = Unfinished(dom, disks)
    _check_idle(name, found)
    return found


def _backing_file(path: str) -> str | None:
    run = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if run.returncode:
        raise ConnectorError(f"cannot read volume {path}: {run.stderr.strip()[-300:]}")
    info = json.loads(run.stdout)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    return str(backing) if backing else None


def _check_idle(name: str, found: Unfinished) -> None:
    """Nobody may still be serving it, and QEMU must open the export afresh: its NBD client
    does not reconnect to a restarted server, so a running domain has to be powered off."""
    for _, sock in found.disks.values():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(sock))
        except OSError:
            continue
        finally:
            probe.close()
        raise UsageError(f"an instant restore of {name} is still running (its export answers)")
    if found.dom.isActive():
        raise UsageError(
            f"domain {name} runs on an interrupted instant restore (reads of data not yet "
            f"copied fail): power it off (virsh destroy {name}; its writes are kept in its "
            "volumes) and rerun to finish"
        )
