"""The `vm.json` file of a VM directory: its schema, atomic load/save, and the mapping to the
hypervisor-neutral VmConfig. Disk file names are validated here because vm.json may come from a
backup made elsewhere: no name may ever point outside the VM directory."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vmkeep.connectors.base import TAGS_KEY, DiskInfo, VmConfig, is_valid_tag
from vmkeep.connectors.files.fileio import pread_full
from vmkeep.errors import ConnectorError, NotFoundError
from vmkeep.safe_files import replace_file

VM_JSON = "vm.json"
INCOMPLETE = "vm.json.incomplete"  # present while an in-place restore has not finished
MIB = 1 << 20
MAX_VM_JSON_BYTES = 4 << 20
LOCATION_KEY = "vmkeep.files.location"  # in VmConfig.metadata: the VM directory
INCOMPLETE_KEY = "vmkeep.files.incomplete"  # in VmConfig.metadata: the INCOMPLETE marker's text
_RESERVED_PREFIX = "vmkeep.files."
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


class DiskEntry(BaseModel):
    """One disk: a stable name and an image file inside the VM directory. `outside`: the
    administrator allows the file to resolve (through symlinks) outside the VM directory;
    without it such a disk is refused, so a planted symlink cannot expose another file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    file: str = Field(min_length=1, max_length=4096)
    format: Literal["raw", "qcow2"] = "raw"
    outside: bool = False

    @field_validator("file")
    @classmethod
    def _relative_inside(cls, value: str) -> str:
        if "\\" in value or "\0" in value:
            raise ValueError("must be a plain relative path")
        path = PurePosixPath(value)
        if path.is_absolute() or any(p in ("..", ".") for p in value.split("/")):
            raise ValueError("must be a relative path inside the VM directory, without '..'")
        if path.as_posix() in (VM_JSON, INCOMPLETE):
            raise ValueError(f"cannot be {path.as_posix()}")
        return path.as_posix()


class VmDocument(BaseModel):
    """The whole vm.json; unknown fields are refused so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    uuid: str
    vcpus: int = Field(ge=1, le=4096)
    memory_mib: int = Field(ge=1, le=1 << 30)
    disks: list[DiskEntry] = Field(default_factory=list)
    # Labels job VM selection matches on (`vms: {include: [{tags: [prod]}]}`).
    tags: list[str] = Field(default_factory=list, max_length=64)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("uuid")
    @classmethod
    def _canonical_uuid(cls, value: str) -> str:
        return str(uuid.UUID(value))

    @field_validator("tags")
    @classmethod
    def _plain_tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not is_valid_tag(tag):
                raise ValueError(
                    f"{tag!r} is not a tag: 1-64 printable characters, no spaces or commas"
                )
        if len(set(value)) != len(value):
            raise ValueError("tags must be unique")
        return value

    @model_validator(mode="after")
    def _unique(self) -> VmDocument:
        names = [d.name for d in self.disks]
        files = [d.file for d in self.disks]
        if len(set(names)) != len(names):
            raise ValueError("disk names must be unique")
        if len(set(files)) != len(files):
            raise ValueError("two disks use the same file")
        return self


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "document"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def load_vm_json(vm_dir: Path) -> VmDocument:
    """Read and validate `vm_dir/vm.json`; NotFoundError if absent, ConnectorError if bad."""
    path = vm_dir / VM_JSON
    try:
        raw = read_small_file(path, MAX_VM_JSON_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"no VM at {vm_dir}: {VM_JSON} not found") from None
    except OSError as exc:
        raise ConnectorError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_VM_JSON_BYTES:
        raise ConnectorError(f"{path} is too large to be a VM description")
    try:
        return VmDocument.model_validate(json.loads(raw))
    except RecursionError:
        raise ConnectorError(f"invalid {path}: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ValidationError):
            raise ConnectorError(f"invalid {path}: {_one_line(exc)}") from None
        raise ConnectorError(f"invalid {path}: not JSON ({exc})") from None


def read_small_file(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file. A FIFO or device is refused without blocking
    (O_NONBLOCK, then fstat) and reads as an OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        return pread_full(fd, limit, 0)
    finally:
        os.close(fd)


def save_vm_json(vm_dir: Path, doc: VmDocument) -> None:
    """Write vm.json atomically: temp file, fsync, rename, fsync of the directory."""
    dumped = doc.model_dump(mode="json")
    for disk in dumped["disks"]:
        if not disk["outside"]:
            del disk["outside"]  # written only where the administrator set it
    if not dumped["tags"]:
        del dumped["tags"]  # a VM without tags keeps the vm.json it always had
    data = (json.dumps(dumped, indent=2) + "\n").encode()
    try:
        replace_file(vm_dir / VM_JSON, data)
    except OSError as exc:
        raise ConnectorError(f"cannot write {vm_dir / VM_JSON}: {exc.strerror}") from None


def to_vm_config(doc: VmDocument, vm_dir: Path, sizes: dict[str, int]) -> VmConfig:
    """VmConfig for a loaded VM; `sizes` maps disk names to virtual sizes read from the images."""
    metadata = dict(doc.metadata)
    metadata[LOCATION_KEY] = str(vm_dir.resolve())
    if doc.tags:
        metadata[TAGS_KEY] = list(doc.tags)
    disks = [
        DiskInfo(name=d.name, size=sizes[d.name], format=d.format, extra={"file": d.file})
        for d in doc.disks
    ]
    return VmConfig(
        name=doc.name,
        uuid=doc.uuid,
        vcpus=doc.vcpus,
        memory=doc.memory_mib * MIB,
        disks=disks,
        metadata=metadata,
    )


def from_vm_config(config: VmConfig, disks: list[DiskEntry]) -> VmDocument:
    """vm.json for a VM being restored; memory is rounded up to whole MiB, our own keys dropped,
    the tags (a files VM's, or a libvirt domain's) back in their own field."""
    metadata = {
        k: v
        for k, v in config.metadata.items()
        if not k.startswith(_RESERVED_PREFIX) and k != TAGS_KEY
    }
    raw_tags = config.metadata.get(TAGS_KEY)
    tags = [t for t in raw_tags if is_valid_tag(t)] if isinstance(raw_tags, list) else []
    try:
        return VmDocument(
            name=config.name,
            uuid=config.uuid,
            vcpus=max(1, config.vcpus),
            memory_mib=max(1, -(-config.memory // MIB)),
            disks=disks,
            tags=list(dict.fromkeys(tags)),
            metadata=metadata,
        )
    except ValidationError as exc:
        raise ConnectorError(f"cannot describe VM {config.name!r}: {_one_line(exc)}") from None


def disk_format(disk: DiskInfo) -> Literal["raw", "qcow2"]:
    """The on-disk format to write: qcow2 when recorded so, raw for anything else."""
    return "qcow2" if disk.format == "qcow2" else "raw"


def safe_disk_filename(disk: DiskInfo, taken: set[str]) -> str:
    """A file name for `disk` that is a single harmless path component, unique among `taken`.

    The recorded name (DiskInfo.extra["file"]) is kept when already safe; otherwise only its last
    component survives, with unusual characters replaced, so a hostile backup cannot escape."""
    ext = ".qcow2" if disk_format(disk) == "qcow2" else ".raw"
    recorded = disk.extra.get("file") if isinstance(disk.extra, dict) else None
    candidate = recorded if isinstance(recorded, str) else ""
    candidate = candidate.replace("\\", "/").rsplit("/", 1)[-1]
    candidate = _UNSAFE.sub("_", candidate).lstrip(".")[:200]
    if not candidate or candidate in (VM_JSON, INCOMPLETE):
        candidate = (_UNSAFE.sub("_", disk.name).lstrip(".")[:200] or "disk") + ext
    stem, dot, suffix = candidate.rpartition(".")
    if not dot:
        stem, suffix = candidate, ""
    name, n = candidate, 1
    while name in taken or name in (VM_JSON, INCOMPLETE):
        name = f"{stem}-{n}.{suffix}" if suffix else f"{stem}-{n}"
        n += 1
    taken.add(name)
    return name


def check_vm_name(name: str) -> str:
    """A VM name becomes a directory name: it must be one plain, visible path component."""
    if not name or name in (".", "..") or name.startswith(".") or re.search(r"[/\\\0]", name):
        raise ConnectorError(
            f"VM name {name!r} cannot be used as a directory name: choose another name"
        )
    if len(name.encode()) > 255:
        raise ConnectorError("VM name is too long for a directory name")
    return name
