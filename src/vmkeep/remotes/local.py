"""A repository in a local directory (also NFS or SMB mounted by the system)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Collection, Iterator, Sequence
from datetime import datetime
from pathlib import Path

from vmkeep.errors import (
    NotFoundError,
    ObjectExistsError,
    ObjectLockedError,
    RemoteError,
    RemoteFullError,
    UsageError,
)

from .base import ObjectStat
from .file_attributes import UNSUPPORTED, get_flags, is_immutable
from .local_immutable import probe_immutability, read_lock_ends
from .object_lock import LockPolicy, ProtectStats
from .retention_records import encode_record, record_name

TEMP_PREFIX = ".tmp-"


def _os_error(exc: OSError, action: str, path: Path) -> RemoteError:
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return RemoteFullError(f"remote is full: no space left {action} {path}")
    if exc.errno == errno.EROFS:
        return RemoteError(f"remote is read-only: cannot {action.split()[0]} {path}")
    if exc.errno == errno.EPERM and is_immutable(path):
        return ObjectLockedError(
            f"{path} is immutable (retention not expired, or not yet lifted by "
            "vmkeep-immutable): not changed",
            str(path),
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return RemoteError(f"permission denied {action} {path}")
    return RemoteError(f"{exc.strerror or exc} {action} {path}")


def _drop_cached(fd: int) -> None:
    """Drop an object's pages from the page cache once they are on disk. A backup writes data
    it will not read again soon, and on a hypervisor the cache belongs to the running guests;
    freed pages are also reused by the next write, where fresh ones cost more (measured in a
    VM: 4 MiB write + fsync took 13 ms of CPU with fresh pages, 1.4 ms with dropped ones).
    Advisory: errors are ignored."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class LocalRemote:
    """Objects are files; writes go to a temp file in the same directory, fsync, then rename."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.url = str(self.root)
        self._unsynced_dirs: set[Path] = set()  # directories whose new entries flush() syncs
        self.lock_policy: LockPolicy | None = None

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if not name or any(p in ("", ".", "..") or p.startswith(TEMP_PREFIX) for p in parts):
            raise RemoteError(f"invalid object name {name!r}")
        return self.root.joinpath(*parts)

    def put(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        path = self._path(name)
        tmp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                _drop_cached(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails when the name exists: an atomic create-if-absent
                os.unlink(tmp)
            self._unsynced_dirs.add(path.parent)
        except FileExistsError as exc:
            tmp.unlink(missing_ok=True)
            raise ObjectExistsError(f"object {name} already exists") from exc
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise _os_error(exc, "writing", path) from exc

    def flush(self) -> None:
        """Directory fsyncs are batched here: one per directory, not one per object."""
        while self._unsynced_dirs:
            path = self._unsynced_dirs.pop()
            try:
                self._sync_dir(path)
            except OSError as exc:
                raise _os_error(exc, "syncing", path) from exc

    @staticmethod
    def _sync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError as exc:
            raise NotFoundError(f"object {name} not found in {self.url}") from exc
        except IsADirectoryError as exc:
            raise NotFoundError(f"object {name} not found in {self.url}") from exc
        except OSError as exc:
            raise _os_error(exc, "reading", path) from exc

    def stat(self, name: str) -> ObjectStat | None:
        try:
            st = self._path(name).stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _os_error(exc, "reading", self._path(name)) from exc
        if not stat.S_ISREG(st.st_mode):
            return None  # a directory is a name prefix, not an object (as on S3/Azure/SMB)
        return ObjectStat(name, st.st_size, st.st_mtime)

    def list(self, prefix: str) -> Iterator[ObjectStat]:
        """Walks only the directories the prefix can match, skipping temp files."""
        head, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*head.split("/")) if head else self.root
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            rel = os.path.relpath(dirpath, self.root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            dirnames[:] = [
                d
                for d in dirnames
                if (base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/")
            ]
            for fn in filenames:
                name = base + fn
                if fn.startswith(TEMP_PREFIX) or not name.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, fn))
                except FileNotFoundError:
                    continue
                yield ObjectStat(name, st.st_size, st.st_mtime)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            error = _os_error(exc, "deleting", path)
            if isinstance(error, ObjectLockedError):
                error.name = name
            raise error from exc

    def purge_incomplete(self, older_than: float) -> int:
        """Remove temp files of writers that died; only those older than `older_than` seconds."""
        removed = 0
        limit = time.time() - older_than
        for dirpath, _dirs, filenames in os.walk(self.root):
            for fn in filenames:
                path = Path(dirpath, fn)
                try:
                    if fn.startswith(TEMP_PREFIX) and path.stat().st_mtime < limit:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise _os_error(exc, "deleting", path) from exc
        return removed

    def free_space(self) -> int | None:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    # -- immutability (retention records + the root-run vmkeep-immutable helper) -----------------

    def set_lock_policy(self, policy: LockPolicy | None) -> None:
        """Refuses a file system without the immutable attribute (NFS, CIFS, FAT)."""
        if policy is not None:
            where = self.root
            while not where.exists() and where != where.parent:
                where = where.parent  # a repository about to be created: its file system
            try:
                fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    get_flags(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                if exc.errno in UNSUPPORTED:
                    raise UsageError(
                        f"the file system of {where} has no immutable attribute "
                        "(NFS and SMB mounts have none): use ext4, XFS or btrfs"
                    ) from exc
                raise _os_error(exc, "reading attributes of", where) from exc
        self.lock_policy = policy

    def protect_point(
        self,
        point_id: str,
        names: Sequence[str],
        coming: Sequence[str],
        until: datetime,
        assured: Collection[str] = (),
    ) -> ProtectStats:
        """Writes the point's retention record, naming every object (`assured` ones too: the
        helper takes each object's latest end over all records); the files become immutable
        at the next run of `vmkeep-immutable apply` (root)."""
        objects = [*names, *coming]
        self.put(record_name(point_id), encode_record(point_id, objects, until), overwrite=False)
        return ProtectStats(recorded=len(objects), floor=until)

    def lock_ends(self) -> dict[str, datetime]:
        """Each object's retention end according to the records (for reports)."""
        return read_lock_ends(self)

    def check_immutability(self) -> str | None:
        return probe_immutability(self)
