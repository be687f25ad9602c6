"""What vmkeep knows about a replica, kept in the replica domain's own <metadata> element: whose
replica it is, which replication checkpoint of the source its disks match, its newest snapshot,
and the identity (inode, size, mtime, ctime) of each volume as the run that wrote it left it.

Why identities: the replica is never started by vmkeep, so any later change of a volume
(someone started the replica, wrote to it, reverted a snapshot, replaced a file) moves its mtime
or ctime (libvirt also chowns images when it starts a domain). Writing the next increment into
such a replica would corrupt it; the run makes a fresh full copy instead."""

from __future__ import annotations

import contextlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmkeep.connectors.libvirt.bindings import error_code, libvirt, one_line
from vmkeep.connectors.libvirt.xmltext import quoteattr
from vmkeep.errors import ConnectorError

NAMESPACE = "https://vmkeep.dev/xmlns/replica/1"
NS_KEY = "vmkeep"
FULL = "full"
INCREMENTAL = "incremental"


@dataclass(frozen=True)
class VolumeStamp:
    """One replica volume's file identity after vmkeep last wrote it."""

    path: str
    size: int
    inode: int
    mtime_ns: int
    ctime_ns: int

    @staticmethod
    def of(path: str) -> VolumeStamp:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConnectorError(f"cannot stat replica volume {path}: {exc.strerror}") from None
        return VolumeStamp(path, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


# Identities of volume files by path (VolumeStamp), or why a file has none (a message); it
# raises ConnectorError only when the host cannot be asked (ssh_nbd.SshTarget.stat).
StatVolumes = Callable[[Sequence[str]], Mapping[str, VolumeStamp | str]]


def local_stat(paths: Sequence[str]) -> dict[str, VolumeStamp | str]:
    """The identities of files on this host."""
    found: dict[str, VolumeStamp | str] = {}
    for path in paths:
        try:
            found[path] = VolumeStamp.of(path)
        except ConnectorError as exc:
            found[path] = str(exc)
    return found


@dataclass
class ReplicaRecord:
    kind: str  # FULL (one dated copy per run) or INCREMENTAL (one replica kept up to date)
    source_uuid: str
    source_name: str
    created: str  # ISO time of the run that last wrote the replica (UTC)
    checkpoint: str | None = None  # replication checkpoint of the source the disks match
    snapshot: str | None = None  # the replica's current snapshot after that run
    disk_sizes: dict[str, int] = field(default_factory=dict)  # target -> virtual size
    volumes: dict[str, VolumeStamp] = field(default_factory=dict)  # target -> identity
    writing: bool = False  # set while a run writes into the replica (a killed run leaves it)

    def to_xml(self) -> str:
        attrs = {
            "kind": self.kind,
            "source-uuid": self.source_uuid,
            "source-name": self.source_name,
            "created": self.created,
        }
        if self.checkpoint:
            attrs["checkpoint"] = self.checkpoint
        if self.snapshot:
            attrs["snapshot"] = self.snapshot
        if self.writing:
            attrs["state"] = "writing"
        head = "".join(f" {k}={quoteattr(v)}" for k, v in attrs.items())
        disks = "".join(
            f"<disk target={quoteattr(t)} size='{self.disk_sizes.get(t, 0)}'"
            f" path={quoteattr(v.path)} bytes='{v.size}' inode='{v.inode}'"
            f" mtime-ns='{v.mtime_ns}' ctime-ns='{v.ctime_ns}'/>"
            for t, v in sorted(self.volumes.items())
        )
        return f"<replica{head}>{disks}</replica>"

    @staticmethod
    def from_xml(xml: str) -> ReplicaRecord:
        """Parse a record; ConnectorError when it is not one vmkeep wrote."""
        try:
            root = ET.fromstring(xml)
            record = ReplicaRecord(
                kind=root.attrib["kind"],
                source_uuid=root.attrib["source-uuid"],
                source_name=root.attrib["source-name"],
                created=root.attrib["created"],
                checkpoint=root.get("checkpoint"),
                snapshot=root.get("snapshot"),
                writing=root.get("state") == "writing",
            )
            for d in root.iterfind("disk"):
                target = d.attrib["target"]
                record.disk_sizes[target] = int(d.attrib["size"])
                record.volumes[target] = VolumeStamp(
                    d.attrib["path"],
                    int(d.attrib["bytes"]),
                    int(d.attrib["inode"]),
                    int(d.attrib["mtime-ns"]),
                    int(d.attrib["ctime-ns"]),
                )
        except (ET.ParseError, KeyError, ValueError) as exc:
            raise ConnectorError(f"unreadable vmkeep replica record ({exc})") from None
        if record.kind not in (FULL, INCREMENTAL):
            raise ConnectorError(f"unknown replica kind {record.kind!r}")
        return record

    def own(self, paths: dict[str, str]) -> None:
        """Record the volumes this run created, before their identity can be taken (or when it
        cannot: a remote host's files). Only recorded volumes are ever deleted with a replica."""
        self.volumes = {target: VolumeStamp(path, -1, -1, -1, -1) for target, path in paths.items()}

    def stamp(self, paths: dict[str, str], stat: StatVolumes | None = None) -> None:
        """Record the volumes' identities as they are now (after the run wrote them); `stat`
        takes them on the replica's host (default: this host's files)."""
        found = (stat or local_stat)(list(paths.values()))
        volumes = {}
        for target, path in paths.items():
            now = found.get(path, f"no identity of replica volume {path}")
            if isinstance(now, str):
                raise ConnectorError(now)
            volumes[target] = now
        self.volumes = volumes


def read_record(dom: Any) -> ReplicaRecord | None:
    """The record in a domain's persistent config; None when it has none (not a replica)."""
    lv = libvirt()
    try:
        xml = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, lv.VIR_DOMAIN_AFFECT_CONFIG)
    except lv.libvirtError as exc:
        if error_code(exc) == lv.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise ConnectorError(f"cannot read metadata of {dom.name()}: {one_line(exc)}") from None
    return ReplicaRecord.from_xml(str(xml))


def write_record(dom: Any, record: ReplicaRecord) -> None:
    lv = libvirt()
    try:
        dom.setMetadata(
            lv.VIR_DOMAIN_METADATA_ELEMENT,
            record.to_xml(),
            NS_KEY,
            NAMESPACE,
            lv.VIR_DOMAIN_AFFECT_CONFIG,
        )
    except lv.libvirtError as exc:
        raise ConnectorError(
            f"cannot record the replica state in {dom.name()}: {one_line(exc)}"
        ) from None


def why_changed(
    dom: Any, record: ReplicaRecord, paths: dict[str, str], stat: StatVolumes | None = None
) -> str | None:
    """Why the replica no longer is what the last run left (None: untouched). `paths` are the
    replica's disk images now, by target; `stat` takes identities on their host."""
    if set(paths) != set(record.volumes):
        return (
            f"its disks are now {', '.join(sorted(paths)) or 'none'}, the last run left "
            f"{', '.join(sorted(record.volumes)) or 'none'}"
        )
    for target, path in sorted(paths.items()):
        was = record.volumes[target]
        if path != was.path:
            return f"disk {target} now points at {path}, not {was.path}"
    found = (stat or local_stat)(sorted(paths.values()))
    for target, path in sorted(paths.items()):
        now = found.get(path, f"no identity of replica volume {path}")
        if isinstance(now, str):
            return now
        if now != record.volumes[target]:
            return f"volume {path} was modified after the last run (started or written to)"
    current = current_snapshot(dom)
    if current != record.snapshot:
        return f"its current snapshot is {current or 'none'}, the last run left {record.snapshot}"
    return None


def current_snapshot(dom: Any) -> str | None:
    lv = libvirt()
    with contextlib.suppress(lv.libvirtError):
        if dom.hasCurrentSnapshot(0):
            return str(dom.snapshotCurrent(0).getName())
    return None
