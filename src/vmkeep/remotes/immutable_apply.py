"""`vmkeep-immutable apply REPO` (run as root): retention records applied as the immutable
attribute. It reads every retention record, computes each object's latest retention end, and
walks chunks/, packs/, index/, manifests/ and retention/, setting the attribute on objects
whose end is in the future and clearing it on the others. It never follows a symlink and
only touches regular files owned by the owner of the repository directory, so the
(unprivileged) owner of the repository cannot make it lock or unlock files elsewhere."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmkeep.errors import RemoteError, UsageError

from .file_attributes import UNSUPPORTED, fd_is_immutable, set_immutable
from .local import TEMP_PREFIX, LocalRemote
from .local_immutable import read_records
from .retention_records import lock_ends

WALKED = ("chunks", "packs", "index", "manifests", "retention")


@dataclass
class ApplyReport:
    records: int = 0
    bad_records: list[str] = field(default_factory=list)
    locked: int = 0  # objects immutable after the run
    newly_locked: int = 0
    unlocked: int = 0  # attributes lifted because every retention naming the object expired
    skipped: list[str] = field(default_factory=list)  # not regular files, or foreign owner
    next_unlock: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["next_unlock"] = self.next_unlock.isoformat() if self.next_unlock else None
        return data


def _walk_files(root: Path) -> Iterator[tuple[str, str, int]]:
    """(object name, file name, directory fd) of `config` and of every entry under the walked
    folders, without following symlinks (os.fwalk hands out directory descriptors)."""
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        yield "config", "config", rootfd
    finally:
        os.close(rootfd)
    for top in WALKED:
        base = root / top
        if not base.is_dir() or base.is_symlink():
            continue
        for dirpath, _dirs, files, dirfd in os.fwalk(base, follow_symlinks=False):
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
            for fn in files:
                yield f"{rel}/{fn}", fn, dirfd


def apply_records(root: Path, now: datetime | None = None, dry_run: bool = False) -> ApplyReport:
    """Sets/clears the immutable attribute from the records; needs CAP_LINUX_IMMUTABLE."""
    now = now or datetime.now(UTC)
    root_stat = os.stat(root, follow_symlinks=False)
    if not stat.S_ISDIR(root_stat.st_mode) or not (root / "config").is_file():
        raise UsageError(f"{root} is not a vmkeep repository directory")
    records, bad = read_records(LocalRemote(root))
    ends = lock_ends(records)
    report = ApplyReport(records=len(records), bad_records=bad)
    for name, fn, dirfd in _walk_files(root):
        if fn.startswith(TEMP_PREFIX):
            continue
        end = ends.get(name)
        keep = end is not None and end > now
        _apply_one(name, fn, dirfd, keep, root_stat.st_uid, report, dry_run)
        if keep and end is not None and (report.next_unlock is None or end < report.next_unlock):
            report.next_unlock = end
    return report


def _apply_one(
    name: str, fn: str, dirfd: int, keep: bool, owner: int, report: ApplyReport, dry_run: bool
) -> None:
    try:
        fd = os.open(fn, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOENT):
            report.skipped.append(name)
            return
        raise RemoteError(f"cannot open {name}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner:
            report.skipped.append(name)
            return
        was = fd_is_immutable(fd)
        if was != keep and not dry_run:
            set_immutable(fd, keep)
        report.locked += int(keep)
        report.newly_locked += int(keep and not was)
        report.unlocked += int(was and not keep)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            raise UsageError(
                "setting the immutable attribute needs root (CAP_LINUX_IMMUTABLE)"
            ) from exc
        if exc.errno in UNSUPPORTED:
            raise UsageError(
                f"the file system does not support the immutable attribute ({name})"
            ) from exc
        raise RemoteError(f"cannot change attributes of {name}: {exc.strerror}") from exc
    finally:
        os.close(fd)
