"""The XML documents of a pull-mode backup job and its checkpoint (LIBVIRT-NOTES §4-5), and
the filled-in job description libvirt returns (export names, exported dirty bitmaps)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vmkeep.connectors.libvirt.transport.nbd_reader import NbdServer
from vmkeep.connectors.libvirt.xmltext import escape, quoteattr

CHECKPOINT_DESCRIPTION = "vmkeep backup"


def checkpoint_xml(name: str, targets: Iterable[str], untracked: Collection[str] = ()) -> str:
    """A checkpoint with a persistent dirty bitmap on each of `targets` except `untracked`
    (disks that cannot keep one: checkpoint='no')."""
    disks = "".join(
        f"<disk name={quoteattr(t)} checkpoint='{'no' if t in untracked else 'bitmap'}'/>"
        for t in targets
    )
    return (
        f"<domaincheckpoint><name>{escape(name)}</name>"
        f"<description>{CHECKPOINT_DESCRIPTION}</description>"
        f"<disks>{disks}</disks></domaincheckpoint>"
    )


def scratch_path(workdir: Path, target: str) -> Path:
    """Explicit scratch files: without them libvirt puts them into the storage pool."""
    return workdir / f"scratch-{target}.qcow2"


def server_xml(server: NbdServer) -> str:
    """The job's NBD server: a unix socket, or TCP (tls='yes': QEMU uses the host's
    backup_tls_x509_cert_dir from qemu.conf)."""
    if server.socket:
        return f"<server transport='unix' socket={quoteattr(server.socket)}/>"
    tls = " tls='yes'" if server.tls else ""
    return f"<server transport='tcp' name={quoteattr(server.host)} port='{server.port}'{tls}/>"


def backup_xml(
    server: NbdServer,
    scratch: Mapping[str, str],
    incremental: str | None = None,
    full: Collection[str] = (),
) -> str:
    """A pull-mode job exporting the disks `scratch` names (target -> scratch file path) on
    `server`, incremental against the checkpoint `incremental` when asked, except the `full`
    disks (per-disk backupmode, libvirt >= 7.6). libvirt 9.0 cannot leave the scratch path to
    libvirt for a listed disk ('filename' must not have null value), so it is always given."""
    inc = f"<incremental>{escape(incremental)}</incremental>" if incremental else ""
    mode = {t: " backupmode='full'" if incremental and t in full else "" for t in scratch}
    disks = "".join(
        f"<disk name={quoteattr(t)} backup='yes' type='file'{mode[t]}>"
        f"<scratch file={quoteattr(path)}/></disk>"
        for t, path in scratch.items()
    )
    return (
        f"<domainbackup mode='pull'>{inc}{server_xml(server)}<disks>{disks}</disks></domainbackup>"
    )


@dataclass(frozen=True)
class JobDisk:
    """One disk of a running job as libvirt describes it."""

    target: str
    export: str  # NBD export name
    bitmap: str | None  # exported dirty bitmap (incremental jobs): qemu:dirty-bitmap:<bitmap>
    mode: str  # "full" or "incremental"


def parse_job(xml: str) -> dict[str, JobDisk]:
    """The disks of `dom.backupGetXMLDesc()` that are backed up, by target."""
    out: dict[str, JobDisk] = {}
    for d in ET.fromstring(xml).iterfind("./disks/disk"):
        if d.get("backup") != "yes":
            continue
        name = d.get("name", "")
        out[name] = JobDisk(
            target=name,
            export=d.get("exportname") or name,
            bitmap=d.get("exportbitmap") or None,
            mode=d.get("backupmode", "full"),
        )
    return out


def checkpoint_disks(xml: str) -> dict[str, str]:
    """target -> checkpoint mode ('bitmap' or 'no') of a checkpoint's XML."""
    return {
        d.get("name", ""): d.get("checkpoint", "bitmap")
        for d in ET.fromstring(xml).iterfind("./disks/disk")
    }


def creation_time(xml: str) -> int:
    el = ET.fromstring(xml).find("creationTime")
    try:
        return int((el.text or "0") if el is not None else "0")
    except ValueError:
        return 0
