"""A repository in a local directory (also NFS or SMB mounted by the system)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from vmkeep.errors import (
    IntegrityError,
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
from .local_writes import DirectRefused, copy_file, drop_cached, write_all, write_direct
from .object_lock import LockPolicy, ProtectStats
from .retention_records import encode_record, record_name

TEMP_PREFIX = ".tmp-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_LAYOUT_DIRS = ("chunks", "manifests", "locks", "retention", "metadata", "packs", "index")
_FANOUT_DIRS = ("chunks", "packs")  # objects under XX/ (format 3: packs, FORMAT.md §13.2)
_FANOUT = re.compile(r"[0-9a-f]{2}")


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


def _purge_dir(dfd: int, limit: float, where: Path) -> int:
    """Unlink the regular `.tmp-*` files of one directory last changed before `limit`."""
    removed = 0
    for fn in os.listdir(dfd):
        if not fn.startswith(TEMP_PREFIX):
            continue
        try:
            st = os.stat(fn, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_mtime < limit:
                os.unlink(fn, dir_fd=dfd)
                removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _os_error(exc, "deleting", where / fn) from exc
    return removed


class LocalRemote:
    """Objects are files; writes go to a temp file in the same directory, fsync, then rename."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.url = str(self.root)
        self._unsynced_dirs: set[Path] = set()  # directories whose new entries flush() syncs
        self._flush_lock = threading.Lock()
        self.lock_policy: LockPolicy | None = None

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if not name or any(p in ("", ".", "..") or p.startswith(TEMP_PREFIX) for p in parts):
            raise RemoteError(f"invalid object name {name!r}")
        return self.root.joinpath(*parts)

    def _open_dir(self, parts: Sequence[str], create: bool) -> int:
        """A descriptor of the repository directory `parts` (below the root), reached one
        component at a time without following a symlink: a `chunks/` that links elsewhere
        (into another repository) is refused, not followed. FileNotFoundError when absent."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, part in enumerate(parts):
                try:
                    inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                    inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = self.root.joinpath(*parts[: i + 1])
                        raise RemoteError(
                            f"{where} is a symlink or not a directory: the repository's "
                            "directories must be real ones inside it (refusing to follow it)"
                        ) from None
                    raise
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_parent(self, name: str, create: bool = False) -> tuple[int, str]:
        """The directory descriptor holding object `name` (see _open_dir) and its leaf name."""
        parts = name.split("/")
        return self._open_dir(parts[:-1], create), parts[-1]

    def put(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        self._put(name, [data], overwrite)

    def put_parts(self, name: str, parts: Sequence[bytes], *, overwrite: bool = True) -> None:
        """One object made of `parts`, written with writev: a format 3 pack's blobs are not
        joined into one more copy of the pack first (docs/DATA-PATH.md, "CPU of a full
        backup"). A subclass that overrides `put` (to count, delay or fail writes) gets the
        joined object through its `put` instead."""
        if type(self).put is not LocalRemote.put:
            self.put(name, b"".join(parts), overwrite=overwrite)
            return
        self._put(name, parts, overwrite)

    def put_file(self, name: str, file: BinaryIO, size: int) -> bool:
        """The first `size` bytes of `file` as a new object (create-if-absent), copied by the
        kernel (a version 2 manifest, never held in memory). False for a subclass that
        overrides `put` (it gets the bytes through its `put`)."""
        if type(self).put is not LocalRemote.put:
            return False
        self._put(name, lambda out: copy_file(file.fileno(), out, size), False)
        return True

    def put_direct(self, name: str, head: memoryview, tail: Sequence[bytes]) -> bool:
        """One object, `head` then `tail`, as `put_parts` writes it, but the whole pages of
        `head` (page-aligned memory: a format 3 packer's buffer) written with O_DIRECT: no
        page-cache fill, no kernel copy, no writeback of a pack that is not read again soon
        (local_writes.py). Published as any object (fsync, then rename). False where the
        file system refuses direct writes, or for a subclass that overrides `put`: nothing
        was written, the caller writes the usual way."""
        if type(self).put is not LocalRemote.put:
            return False
        try:
            self._put(name, lambda fd: write_direct(fd, head, tail), True, os.O_DIRECT)
        except DirectRefused:
            return False
        return True

    def _put(
        self,
        name: str,
        parts: Sequence[bytes | memoryview] | Callable[[int], None],
        overwrite: bool,
        flags: int = 0,
    ) -> None:
        """`parts` (or a function writing the temp file, opened with `flags` added) written
        into a temp file, made durable, then renamed to `name`."""
        path = self._path(name)
        tmp = f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}"
        try:
            if not self.root.exists():
                self.root.mkdir(parents=True, exist_ok=True)
            dfd, leaf = self._open_parent(name, create=True)
        except OSError as exc:
            raise _os_error(exc, "writing", path) from exc
        try:
            fd = os.open(tmp, _CREATE_FLAGS | flags, 0o600, dir_fd=dfd)
            try:
                parts(fd) if callable(parts) else write_all(fd, parts)
                os.fsync(fd)
                drop_cached(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, leaf, src_dir_fd=dfd, dst_dir_fd=dfd)
            else:  # link fails when the name exists: an atomic create-if-absent
                os.link(tmp, leaf, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                os.unlink(tmp, dir_fd=dfd)
            self._unsynced_dirs.add(path.parent)
        except FileExistsError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise ObjectExistsError(f"object {name} already exists") from exc
        except (OSError, DirectRefused) as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            if isinstance(exc, DirectRefused) or (exc.errno == errno.EINVAL and flags):
                raise DirectRefused from None  # O_DIRECT refused: nothing written
            raise _os_error(exc, "writing", path) from exc
        finally:
            os.close(dfd)

    def flush(self) -> None:
        """Directory fsyncs are batched here: one per directory, not one per object. One
        flush at a time: a flush that found nothing left to pop must not return while
        another thread's flush is still syncing a directory it popped (format 3's pack
        uploaders flush after each pack while the index writer flushes before its index)."""
        with self._flush_lock:
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
            fd = self._open_object(name)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFoundError(f"object {name} not found in {self.url}") from exc
        except OSError as exc:
            raise _os_error(exc, "reading", path) from exc
        try:
            with os.fdopen(fd, "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except OSError as exc:
            raise _os_error(exc, "reading", path) from exc

    def get_direct(self, name: str, offset: int, into: memoryview) -> memoryview | None:
        """Bytes of object `name` from `offset` (a multiple of 4096) read with O_DIRECT into
        `into` (page-aligned, a multiple of 4096 long), past the page cache: no cache fill
        and no kernel copy for a pack a restore reads once (repository/read_buffers.py).
        Returns the view of `into` read (shorter at the object's end), or None where the
        file system refuses direct reads (the caller then uses `get`)."""
        path = self._path(name)
        try:
            fd = self._open_object(name, os.O_DIRECT)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFoundError(f"object {name} not found in {self.url}") from exc
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return None
            raise _os_error(exc, "reading", path) from exc
        try:
            done = 0
            while done < len(into):
                n = os.preadv(fd, [into[done:]], offset + done)
                if n <= 0:
                    break
                done += n
            return into[:done]
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return None
            raise _os_error(exc, "reading", path) from exc
        finally:
            os.close(fd)

    def _open_object(self, name: str, flags: int = 0) -> int:
        """A read descriptor of object `name`, which must be a regular file inside the
        repository: a symlink, FIFO, socket or device is a corrupt object (stat'ed before it is
        opened, and opened non-blocking, so it never hangs a reader). `flags`: added to the
        open's (O_DIRECT)."""
        dfd, leaf = self._open_parent(name)
        try:
            st = os.stat(leaf, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise FileNotFoundError(name)  # a directory is a name prefix, not an object
            self._check_regular(name, st.st_mode)
            fd = os.open(leaf, _READ_FLAGS | flags, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):  # swapped for a link or socket meanwhile
                raise IntegrityError(f"object {name} in {self.url} is not a regular file") from None
            raise
        finally:
            os.close(dfd)
        try:
            self._check_regular(name, os.fstat(fd).st_mode)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_regular(self, name: str, mode: int) -> None:
        if not stat.S_ISREG(mode):
            raise IntegrityError(
                f"object {name} in {self.url} is not a regular file (a symlink, FIFO, socket "
                "or device): the repository is damaged or tampered with"
            )

    def stat(self, name: str) -> ObjectStat | None:
        path = self._path(name)
        try:
            dfd, leaf = self._open_parent(name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _os_error(exc, "reading", path) from exc
        try:
            st = os.stat(leaf, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _os_error(exc, "reading", path) from exc
        finally:
            os.close(dfd)
        if not stat.S_ISREG(st.st_mode):
            return None  # a directory is a name prefix, not an object (as on S3/Azure/SMB)
        return ObjectStat(name, st.st_size, st.st_mtime)

    def list(self, prefix: str) -> Iterator[ObjectStat]:
        """Walks only the directories the prefix can match, skipping temp files; never follows
        a symlink (a linked directory is not descended, a linked or special file not listed)."""
        head, _, _ = prefix.rpartition("/")
        try:
            dfd = self._open_dir(head.split("/") if head else [], create=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise _os_error(exc, "listing", self.root / head) from exc
        try:
            for dirpath, dirnames, filenames, dirfd in os.fwalk(
                ".", dir_fd=dfd, follow_symlinks=False
            ):
                rel = os.path.normpath(dirpath)
                base = f"{head}/" if head else ""
                if rel != ".":
                    base += rel.replace(os.sep, "/") + "/"
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
                        st = os.stat(fn, dir_fd=dirfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        yield ObjectStat(name, st.st_size, st.st_mtime)
        finally:
            os.close(dfd)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            dfd, leaf = self._open_parent(name)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise _os_error(exc, "deleting", path) from exc
        try:
            os.unlink(leaf, dir_fd=dfd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            error = _os_error(exc, "deleting", path)
            if isinstance(error, ObjectLockedError):
                error.name = name
            raise error from exc
        finally:
            os.close(dfd)
        self._remove_if_empty(name.split("/")[:-1])

    def _remove_if_empty(self, parts: Sequence[str]) -> None:
        """A directory outside the repository's layout (e.g. `remote test`'s probe objects)
        goes with its last object, so that it does not make the location look non-empty."""
        if len(parts) != 1 or parts[0] in _LAYOUT_DIRS:
            return
        try:
            root = self._open_dir([], create=False)
        except (OSError, RemoteError):
            return
        try:
            os.rmdir(parts[0], dir_fd=root)
        except OSError:
            pass  # not empty, already gone, or a symlink: nothing to tidy
        finally:
            os.close(root)

    def purge_incomplete(self, older_than: float) -> int:
        """Remove temp files of writers that died; only those older than `older_than` seconds.
        Only the directories the layout has (FORMAT.md §1) are looked at, never followed
        through a symlink, and only regular files named `.tmp-*` are removed: a user's own
        files elsewhere under the root are never touched."""
        removed = 0
        limit = time.time() - older_than
        for parts in self._layout_dirs():
            try:
                dfd = self._open_dir(parts, create=False)
            except (FileNotFoundError, NotADirectoryError, RemoteError):
                continue
            except OSError as exc:
                raise _os_error(exc, "listing", self.root.joinpath(*parts)) from exc
            try:
                removed += _purge_dir(dfd, limit, self.root.joinpath(*parts))
            finally:
                os.close(dfd)
        return removed

    def _layout_dirs(self) -> Iterator[tuple[str, ...]]:
        """The root, its layout directories and chunks/XX, packs/XX: where objects (and so
        temps) live."""
        yield ()
        yield from ((d,) for d in _LAYOUT_DIRS)
        for top in _FANOUT_DIRS:
            try:
                fd = self._open_dir([top], create=False)
            except (OSError, RemoteError):
                continue
            try:
                names = os.listdir(fd)
            finally:
                os.close(fd)
            yield from ((top, n) for n in sorted(names) if _FANOUT.fullmatch(n))

    def foreign_entry(self) -> str | None:
        """The first entry of the root that a new repository must not be created over (the
        root is not empty and holds no repository); `lost+found` of a fresh file system is
        allowed. None when the root is absent or empty."""
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _os_error(exc, "listing", self.root) from exc
        return next((n for n in names if n != "lost+found"), None)

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

    def lock_ends_of(self, names: Sequence[str]) -> dict[str, datetime]:
        """Which of `names` unexpired retention records name, until when (format 3's gc:
        pack_gc_locks.py). A file still immutable after its records expired (the helper has
        not run) is refused at its delete instead."""
        if not names:
            return {}
        ends, now = read_lock_ends(self), datetime.now(UTC)
        return {n: ends[n] for n in names if n in ends and ends[n] > now}

    def check_immutability(self) -> str | None:
        return probe_immutability(self, self.root)
