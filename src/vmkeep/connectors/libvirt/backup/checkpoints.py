"""vmkeep's libvirt checkpoints: naming, choosing the base of an incremental job, deleting and
pruning. A checkpoint is per domain (one dirty bitmap per disk), and its name is the change
token the repository records, so the next run can name its base (LIBVIRT-NOTES §5-6, §10)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vmkeep.connectors.libvirt.backup import offline_checkpoint
from vmkeep.connectors.libvirt.backup.jobxml import checkpoint_disks, creation_time
from vmkeep.connectors.libvirt.bindings import error_code, libvirt, one_line
from vmkeep.connectors.libvirt.domxml import DomainDisk
from vmkeep.connectors.libvirt.transport import qemu_img
from vmkeep.connectors.libvirt.transport.qemu_img import QemuImg

# Backup and replication checkpoints live side by side on a domain, each kind pruned only by
# its own runs: a backup never deletes a replication checkpoint (the base of the next
# replication) and a replication never deletes a backup one. Other tools' checkpoints are never
# touched. Neither prefix is a prefix of the other.
PREFIX = "vmkeep-backup-"
REPLICATION_PREFIX = "vmkeep-repl-"
PREFIXES = (PREFIX, REPLICATION_PREFIX)
QCOW2_MAGIC = b"QFI\xfb"


def new_name(prefix: str = PREFIX) -> str:
    """Unique, and sorting by name sorts by creation (UTC, microseconds)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{prefix}{stamp}-{secrets.token_hex(2)}"


def qcow2_version(path: str) -> int | None:
    """The qcow2 header version of a local image (2 = compat 0.10, 3 = compat 1.1); None when
    the file cannot be read here (then libvirt's own check decides)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if len(head) < 8 or head[:4] != QCOW2_MAGIC:
        return None
    return int.from_bytes(head[4:8], "big")


def untracked(disks: Iterable[DomainDisk], local: bool) -> dict[str, str]:
    """target -> why that disk cannot keep a dirty bitmap. The other disks can: a checkpoint
    covers just those, and only the untracked ones are read in full by every backup. `local`:
    the images can be read here (a qcow2 v2 header is seen; else libvirt's own check decides)."""
    reasons = {}
    for d in disks:
        local_qcow2 = local and d.source and d.fmt == "qcow2"
        why = untracked_reason(d, qcow2_version(d.source) if local_qcow2 else None)
        if why:
            reasons[d.target] = why
    return reasons


def untracked_reason(d: DomainDisk, version: int | None) -> str | None:
    """Why disk `d` (qcow2 header `version`, if known) cannot keep a dirty bitmap; None: it can."""
    if d.fmt != "qcow2":
        return f"disk {d.target} is {d.fmt}: only qcow2 images keep dirty bitmaps"
    if version == 2:
        return (
            f"disk {d.target} is qcow2 v2 (compat 0.10), which cannot store dirty bitmaps; "
            f"upgrade it with 'qemu-img amend -o compat=1.1 {d.source}' while the VM is off"
        )
    return None


@dataclass
class DeltaPlan:
    """What a job reads: the disks in `incremental` only where `base`'s bitmaps say they
    changed, every other disk in full; `notes` say why a disk is read in full."""

    base: str | None = None
    incremental: frozenset[str] = frozenset()
    notes: list[str] = field(default_factory=list)

    def full(self, why: str) -> DeltaPlan:
        return DeltaPlan(notes=[*self.notes, why])


def _lookup(dom: Any, name: str) -> Any | None:
    lv = libvirt()
    try:
        return dom.checkpointLookupByName(name, 0)
    except lv.libvirtError as exc:
        if error_code(exc) == lv.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return None
        raise


def plan_delta(
    dom: Any,
    disks: list[DomainDisk],
    tracked: Iterable[str],
    previous: Mapping[str, str | None],
    prefix: str = PREFIX,
) -> DeltaPlan:
    """Per disk: incremental against the previous restore point's checkpoint when that disk is
    `tracked` (keeps a bitmap), was in that point under that checkpoint, and the checkpoint
    (still on the domain, of the `prefix` kind) has a bitmap for it; else a full read of that
    disk, with the reason. A disk added since, or a raw one, no longer makes every disk full."""
    lv = libvirt()
    plan = DeltaPlan()
    if not previous:
        return plan.full("no previous restore point: full read")
    current = {d.target for d in disks}
    removed = sorted(previous.keys() - current)
    if removed:
        plan.notes.append(f"disk {', '.join(removed)} removed since the previous restore point")
    tracked = set(tracked)
    known = {t: previous[t] for t in sorted(tracked & previous.keys())}
    tokens = set(known.values()) - {None}
    if not tokens:
        return plan.full(
            "the previous restore point has no checkpoint (full or offline read): full read"
        )
    if len(tokens) != 1:
        return plan.full("the previous restore point's disks name different checkpoints: full read")
    name = tokens.pop()
    assert name is not None
    if not name.startswith(prefix):
        return plan.full(
            f"previous change token {name!r} is not a vmkeep checkpoint ({prefix}*): full read"
        )
    try:
        cp = _lookup(dom, name)
        if cp is None:
            return plan.full(f"checkpoint {name} no longer exists on the domain: full read")
        cp_disks = checkpoint_disks(cp.getXMLDesc(lv.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
    except lv.libvirtError as exc:
        return plan.full(f"checkpoint {name} cannot be read ({one_line(exc)}): full read")
    incremental = set()
    for t in sorted(tracked):
        if t not in previous:
            plan.notes.append(f"disk {t} added since the previous restore point: full read of it")
        elif known[t] != name:
            plan.notes.append(f"disk {t} has no checkpoint in the previous point: full read of it")
        elif cp_disks.get(t) != "bitmap":
            plan.notes.append(f"checkpoint {name} has no bitmap for {t}: full read of it")
        else:
            incremental.add(t)
    if not incremental:
        return DeltaPlan(notes=plan.notes)
    return DeltaPlan(name, frozenset(incremental), plan.notes)


def delete(
    dom: Any, name: str, disks: Iterable[DomainDisk] = (), tool: QemuImg | None = qemu_img.LOCAL
) -> str | None:
    """Delete a checkpoint and its bitmaps; None when done (or already gone), else a note.

    A shut-off domain refuses the normal delete: its checkpoint is deleted as
    offline_checkpoint deletes one (`tool`: where qemu-img reaches the images; None: nowhere).
    A checkpoint whose bitmap is gone (crash) cannot be deleted normally: then only libvirt's
    metadata is dropped."""
    lv = libvirt()
    try:
        cp = _lookup(dom, name)
        if cp is None:
            return None
        if not dom.isActive():
            return offline_checkpoint.delete(dom, name, disks, tool)
        try:
            cp.delete(0)
            return None
        except lv.libvirtError as exc:
            first = one_line(exc)
        cp.delete(lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except lv.libvirtError as exc:
        return f"could not delete checkpoint {name}: {one_line(exc)}"
    return f"checkpoint {name}: only its metadata was deleted ({first})"


def vmkeep_checkpoints(dom: Any, prefix: str = PREFIX) -> list[str]:
    """Names of this domain's checkpoints of one vmkeep kind (`prefix`), oldest first."""
    lv = libvirt()
    found = []
    for cp in dom.listAllCheckpoints(0):
        name = cp.getName()
        if name.startswith(prefix):
            try:
                created = creation_time(cp.getXMLDesc(lv.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
            except lv.libvirtError:
                created = 0
            found.append((created, name))
    return [name for _, name in sorted(found)]


def prune(
    dom: Any,
    keep: int,
    disks: Iterable[DomainDisk] = (),
    prefix: str = PREFIX,
    delete_one: Callable[[Any, str, list[DomainDisk]], str | None] | None = None,
) -> list[str]:
    """Delete all but the newest `keep` (at least 1) checkpoints of the `prefix` kind; notes on
    trouble. Checkpoints of the other kind and of other tools are left alone. `delete_one`
    replaces `delete` (a shut-off domain's checkpoints are deleted by offline_checkpoint)."""
    lv = libvirt()
    try:
        names = vmkeep_checkpoints(dom, prefix)
    except lv.libvirtError as exc:
        return [f"could not list checkpoints to prune: {one_line(exc)}"]
    disks = list(disks)
    notes = []
    for name in names[: max(0, len(names) - max(1, keep))]:
        note = (delete_one or delete)(dom, name, disks)
        if note:
            notes.append(note)
    return notes
