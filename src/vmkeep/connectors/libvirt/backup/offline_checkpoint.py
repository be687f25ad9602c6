"""Checkpoints of a shut-off domain, made and removed without starting it.

libvirt 9 refuses to create (or normally delete) a checkpoint of an inactive domain, but it
accepts a checkpoint *redefinition* (VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE) and a metadata-only
delete. So the bitmaps are added to and removed from the qcow2 images with `qemu-img bitmap`,
and libvirt's metadata is kept in step with them: after the domain starts again, libvirt sees
an ordinary checkpoint and a live incremental job from it is exact (LIBVIRT-NOTES §7, §12)."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from vmkeep.connectors.libvirt.backup.jobxml import CHECKPOINT_DESCRIPTION, creation_time
from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.connectors.libvirt.domxml import DomainDisk
from vmkeep.connectors.libvirt.transport import qemu_img
from vmkeep.connectors.libvirt.transport.qemu_img import QemuImg
from vmkeep.connectors.libvirt.xmltext import escape, quoteattr
from vmkeep.errors import ConnectorError


def bitmap_problem(
    disks: Iterable[DomainDisk], name: str, infos: Mapping[str, dict[str, Any]]
) -> str | None:
    """Why the bitmap `name` cannot be trusted as a delta base on some disk; None if it can.
    `infos`: `qemu-img info` of the disks' images (qemu_img.image_infos)."""
    for d in disks:
        flags = qemu_img.bitmaps(infos[d.source]).get(name)
        if flags is None:
            return f"disk {d.target} has no bitmap {name} in its image"
        if "in-use" in flags:
            return f"bitmap {name} of disk {d.target} was not stored cleanly (QEMU crashed?)"
        if "auto" not in flags:
            return f"bitmap {name} of disk {d.target} is disabled (not recording writes)"
    return None


def redefine_xml(
    name: str, parent: str | None, targets: Iterable[str], untracked: Collection[str] = ()
) -> str:
    """The metadata libvirt keeps for a checkpoint whose bitmaps already exist (none on the
    `untracked` disks)."""
    disks = "".join(
        f"<disk name={quoteattr(t)} checkpoint='no'/>"
        if t in untracked
        else f"<disk name={quoteattr(t)} checkpoint='bitmap' bitmap={quoteattr(name)}/>"
        for t in targets
    )
    par = f"<parent><name>{escape(parent)}</name></parent>" if parent else ""
    return (
        f"<domaincheckpoint><name>{escape(name)}</name>"
        f"<description>{CHECKPOINT_DESCRIPTION}</description>{par}"
        f"<creationTime>{int(time.time())}</creationTime>"
        f"<disks>{disks}</disks></domaincheckpoint>"
    )


def newest_checkpoint(dom: Any) -> str | None:
    """The most recently created checkpoint of any kind (libvirt's parent for a new one)."""
    lv = libvirt()
    found = []
    for cp in dom.listAllCheckpoints(0):
        try:
            created = creation_time(cp.getXMLDesc(lv.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        except lv.libvirtError:
            created = 0
        found.append((created, str(cp.getName())))
    return max(found)[1] if found else None


def create(
    dom: Any,
    name: str,
    disks: list[DomainDisk],
    untracked: Collection[str] = (),
    tool: QemuImg = qemu_img.LOCAL,
) -> None:
    """Add the bitmap `name` (recording) to every disk image but the `untracked`, then
    libvirt's metadata for it; on failure, nothing is left (bitmaps added are removed)."""
    lv = libvirt()
    images = [d.source for d in disks if d.target not in untracked]
    failed = qemu_img.add_bitmaps(tool, images, name)
    added = [i for i in images if i not in failed]
    try:
        parent = newest_checkpoint(dom)
        if failed:
            image, error = next(iter(failed.items()))
            raise ConnectorError(
                f"cannot add bitmap {name} to {image}{qemu_img.where(tool)}: {error}"
            )
        dom.checkpointCreateXML(
            redefine_xml(name, parent, [d.target for d in disks], untracked),
            lv.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE,
        )
    except BaseException as exc:
        qemu_img.remove_bitmaps(tool, added, name)
        if isinstance(exc, lv.libvirtError):
            raise ConnectorError(
                f"cannot record checkpoint {name} of shut-off domain {dom.name()}: {one_line(exc)}"
            ) from None
        raise


def delete(
    dom: Any, name: str, disks: Iterable[DomainDisk], tool: QemuImg | None = qemu_img.LOCAL
) -> str | None:
    """Delete a checkpoint of a shut-off domain: libvirt's metadata, then the bitmaps in the
    images (`tool`: where qemu-img reaches them; None: nowhere). None when done (or it was
    already gone), else a note saying what is left."""
    lv = libvirt()
    try:
        cp = dom.checkpointLookupByName(name, 0)
        cp.delete(lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except lv.libvirtError as exc:
        if exc.get_error_code() != lv.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return f"could not delete checkpoint {name}: {one_line(exc)}"
    disks = [d for d in disks if d.fmt == "qcow2"]
    left = set(qemu_img.remove_bitmaps(tool, [d.source for d in disks], name))
    if left:
        targets = ", ".join(d.target for d in disks if d.source in left)
        return f"checkpoint {name}: bitmap left in the image of {targets}"
    return None
