"""Files on the share, each operation on a connection the caller borrowed: create
directories, write a file atomically, read, stat, list a directory, delete, ask free space.

Puts are built from the few SMB commands that make them atomic and durable: CREATE a temp
file, WRITE, FLUSH (Samba fsyncs), then rename it over the final name with
SET_INFO(FileRenameInformation), or, for create-if-absent, hard-link it to the final name with
SET_INFO(FileLinkInformation) and delete the temp name."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from smbprotocol.exceptions import SMBResponseException  # type: ignore[import-untyped]
from smbprotocol.file_info import (  # type: ignore[import-untyped]
    FileDispositionInformation,
    FileLinkInformation,
    FileRenameInformation,
)
from smbprotocol.header import NtStatus  # type: ignore[import-untyped]
from smbprotocol.open import (  # type: ignore[import-untyped]
    CreateDisposition,
    CreateOptions,
    DirectoryAccessMask,
    FilePipePrinterAccessMask,
)

from vmkeep.errors import ObjectExistsError, RemoteError

from . import messages as m
from .connection import Conn
from .errors import RECONNECT, check, fail, has_status, missing

TEMP_PREFIX = ".tmp-"
# An object's bytes to write: all of them, or (a version 2 manifest streamed from its file)
# its size and a function reading (offset, length) of it.
Body = bytes | tuple[int, Callable[[int, int], bytes]]
# Answers to a hard link from a server or file system without them: fall back to a rename.
LINK_UNSUPPORTED = {
    NtStatus.STATUS_NOT_SUPPORTED,
    NtStatus.STATUS_INVALID_DEVICE_REQUEST,
    NtStatus.STATUS_INVALID_INFO_CLASS,
    NtStatus.STATUS_INVALID_PARAMETER,
}


def join(a: str, b: str) -> str:
    """Two parts of a path on the share, either of which may be empty."""
    return f"{a}\\{b}" if a and b else a or b


def close_quietly(conn: Conn, file_id: bytes) -> None:
    """CLOSE a handle; a refusal does not matter (a lost connection still raises)."""
    with contextlib.suppress(SMBResponseException):
        conn.call(m.close(file_id))


def _close_if_alive(conn: Conn, file_id: bytes) -> None:
    """CLOSE a handle after an operation, unless the connection that held it is gone."""
    if conn.alive():
        close_quietly(conn, file_id)


class ShareFiles:
    """The files of the share as seen through one borrowed connection, for one attempt of an
    operation. A refused request becomes the user's error, which names the path with
    `where(path)`."""

    def __init__(self, conn: Conn, where: Callable[[str], str], links: bool = True) -> None:
        self.conn = conn
        self.where = where
        self.links = links  # whether create-if-absent may use hard links (see `_link`)

    def _check(self, result: bytes | SMBResponseException, action: str, path: str) -> bytes:
        return check(result, action, self.where(path))

    def _open(
        self, create: Any, then: Any, action: str, path: str, *absent: int
    ) -> tuple[m.Opened, bytes | SMBResponseException] | None:
        """[`create` + `then`, which uses the handle `create` opens] in one round trip: the
        opened file and the answer to `then`; None when `path` does not exist (or the CREATE
        failed with a status in `absent`)."""
        res = self.conn.compound([create, then])
        if missing(res[0], *absent):
            return None
        return m.parse_create(self._check(res[0], action, path)), res[1]

    def _making_parents(self, msgs: list[Any], parent: str) -> list[bytes | SMBResponseException]:
        """Send a compound that CREATEs in `parent`; when `parent` is missing, create it (and
        its parents) and send the compound again."""
        res = self.conn.compound(msgs)
        if parent and has_status(res[0], NtStatus.STATUS_OBJECT_PATH_NOT_FOUND):
            self.mkdirs(parent)
            res = self.conn.compound(msgs)
        return res

    def mkdirs(self, path: str) -> None:
        """Create `path` and its missing parents (FILE_OPEN_IF: racing creators all win)."""
        if not path:
            return
        msgs = [
            m.open_dir(
                path, DirectoryAccessMask.FILE_READ_ATTRIBUTES, CreateDisposition.FILE_OPEN_IF
            ),
            m.close(m.RELATED_FID),
        ]
        res = self._making_parents(msgs, path.rpartition("\\")[0])
        self._check(res[0], "creating directory", path)

    def discard_open(self, file_id: bytes) -> None:
        """Delete a temp file through its open handle and close it, in one round trip; best
        effort."""
        info = FileDispositionInformation()
        info["delete_pending"] = True
        self.conn.compound([m.set_info(file_id, info), m.close(file_id)])

    def unlink(self, path: str) -> bool:
        """Delete a file by path; False when it was not there."""
        create = m.create(
            path,
            FilePipePrinterAccessMask.DELETE | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES,
            CreateDisposition.FILE_OPEN,
            CreateOptions.FILE_DELETE_ON_CLOSE,
            share=m.SHARE_ALL,
        )
        return self._open(create, m.close(m.RELATED_FID), "deleting", path) is not None

    def write(
        self,
        path: str,
        name: str,
        data: Body,
        overwrite: bool,
        state: dict[str, bool],
    ) -> None:
        """One attempt at putting object `name` at `path`: the data goes to a temp file, which
        then gets its final name. `state["sent"]` stays True when the request that gives it
        its name was sent but its answer lost."""
        parent = path.rpartition("\\")[0]
        tmp = join(parent, f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}")
        fid = self._write_temp(tmp, path, data)
        if overwrite or not self.links:
            self._rename(fid, tmp, path, name, overwrite, state)
        else:
            self._link(fid, tmp, path, name, state)

    def _write_temp(self, tmp: str, path: str, data: Body) -> bytes:
        """[CREATE temp + WRITE] in one round trip, more WRITEs, FLUSH (the server fsyncs);
        returns the temp file's open handle. A body read from a file is read a WRITE at a
        time."""
        size, piece = _pieces(data)
        first = self.conn.span(size, self.conn.max_write, spare=1)
        create = m.create(
            tmp,
            FilePipePrinterAccessMask.FILE_WRITE_DATA
            | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES
            | FilePipePrinterAccessMask.DELETE,
            CreateDisposition.FILE_CREATE,
        )
        parent = tmp.rpartition("\\")[0]
        res = self._making_parents([create, m.write(m.RELATED_FID, 0, piece(0, first))], parent)
        fid = m.parse_create(self._check(res[0], "writing", path)).file_id
        try:
            written = m.written(self._check(res[1], "writing", path))
            while written < size:
                n = self.conn.span(size - written, self.conn.max_write)
                body = self.conn.call(m.write(fid, written, piece(written, n)))
                written += m.written(body)
            self.conn.call(m.flush(fid))
        except SMBResponseException as exc:
            self.discard_open(fid)
            fail(exc, "writing", self.where(path))
        except BaseException:
            if self.conn.alive():
                self.discard_open(fid)
            raise
        return fid

    def _rename(
        self, fid: bytes, tmp: str, path: str, name: str, overwrite: bool, state: dict[str, bool]
    ) -> None:
        """[rename + CLOSE] of the temp file. Replacing is atomic (rename(2) on Samba); without
        `overwrite` it is only as atomic as the server makes it: Samba checks, then renames."""
        rename = FileRenameInformation()
        rename["replace_if_exists"] = overwrite
        rename["root_directory"] = 0
        rename["file_name"] = path
        state["sent"] = True
        res = self.conn.compound([m.set_info(fid, rename), m.close(fid)])
        state["sent"] = False  # answered: the rename did happen, or did not
        if not isinstance(res[0], SMBResponseException):
            return
        # The rename failed: the temp file must go. Whether the CLOSE ran after a failed
        # request of a related compound differs between servers; clean up either way.
        if isinstance(res[1], SMBResponseException):
            self.discard_open(fid)
        else:
            with contextlib.suppress(SMBResponseException):
                self.unlink(tmp)
        if res[0].status == NtStatus.STATUS_OBJECT_NAME_COLLISION:
            if overwrite:  # replace_if_exists cannot replace a directory
                raise RemoteError(f"cannot write {self.where(path)}: it is a directory")
            raise ObjectExistsError(f"object {name} already exists")
        self._check(res[0], "writing", path)

    def _link(self, fid: bytes, tmp: str, path: str, name: str, state: dict[str, bool]) -> None:
        """Create-if-absent: hard-link the temp file to the final name without "replace if
        exists", then delete the temp name. Samba turns the link into link(2), which refuses
        an existing name atomically (its rename checks, then renames: two writers can win)."""
        link = FileLinkInformation()
        link["replace_if_exists"] = False
        link["root_directory"] = 0
        link["file_name"] = path
        state["sent"] = True
        try:
            self.conn.call(m.set_info(fid, link))
        except SMBResponseException as exc:
            state["sent"] = False
            if exc.status in LINK_UNSUPPORTED:  # no hard links on this share: rename instead
                self.links = False
                self._rename(fid, tmp, path, name, False, state)
                return
            self.discard_open(fid)
            if exc.status == NtStatus.STATUS_OBJECT_NAME_COLLISION:
                raise ObjectExistsError(f"object {name} already exists") from exc
            fail(exc, "writing", self.where(path))
        state["sent"] = False
        self.discard_open(fid)  # a temp name left behind is invisible, and gc removes it

    def read(self, path: str, offset: int, length: int | None) -> bytes | None:
        """A file or a range of it, None when there is no such file: [CREATE + READ] in one
        round trip, more READs for what one READ could not carry, then CLOSE."""
        want = self.conn.max_read if length is None else length
        first = self.conn.span(max(want, 1), self.conn.max_read, spare=1)
        create = m.create(
            path,
            FilePipePrinterAccessMask.FILE_READ_DATA
            | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES,
            CreateDisposition.FILE_OPEN,
        )
        first_read = m.read(m.RELATED_FID, offset, first)
        found = self._open(create, first_read, "reading", path, NtStatus.STATUS_FILE_IS_A_DIRECTORY)
        if found is None:
            return None
        opened, head = found
        try:
            end = opened.size if length is None else min(opened.size, offset + length)
            chunks: list[bytes] = []
            got = offset
            if isinstance(head, SMBResponseException):
                if head.status != NtStatus.STATUS_END_OF_FILE:
                    self._check(head, "reading", path)
            else:
                part = m.read_data(head)
                chunks.append(part)
                got += len(part)
            while got < end:
                n = self.conn.span(end - got, self.conn.max_read)
                part = m.read_data(self.conn.call(m.read(opened.file_id, got, n)))
                if not part:
                    break
                chunks.append(part)
                got += len(part)
        finally:
            _close_if_alive(self.conn, opened.file_id)
        data = b"".join(chunks)
        return data if length is None else data[:length]

    def stat(self, path: str) -> m.Opened | None:
        """Size and modification time of a file, None when there is no such file."""
        create = m.create(
            path,
            FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES,
            CreateDisposition.FILE_OPEN,
            share=m.SHARE_ALL,
        )
        close = m.close(m.RELATED_FID)
        found = self._open(create, close, "reading", path, NtStatus.STATUS_FILE_IS_A_DIRECTORY)
        return None if found is None else found[0]

    def scan(
        self, dir_path: str, pattern: str, page_bytes: int, on_page: Callable[[], None]
    ) -> list[m.DirEntry]:
        """Every entry of one directory, page by page (`on_page` counts the QUERY_DIRECTORY
        round trips); empty when the directory does not exist."""
        page = min(page_bytes, self.conn.max_read)
        create = m.open_dir(
            dir_path,
            DirectoryAccessMask.FILE_LIST_DIRECTORY | DirectoryAccessMask.FILE_READ_ATTRIBUTES,
            CreateDisposition.FILE_OPEN,
        )
        query = m.query_directory(m.RELATED_FID, pattern, page)
        found = self._open(create, query, "listing", dir_path, NtStatus.STATUS_NOT_A_DIRECTORY)
        if found is None:
            return []
        fid, result = found[0].file_id, found[1]
        entries: list[m.DirEntry] = []
        try:
            while True:
                on_page()
                if isinstance(result, SMBResponseException):
                    if result.status in (
                        NtStatus.STATUS_NO_MORE_FILES,
                        NtStatus.STATUS_NO_SUCH_FILE,
                    ):
                        break
                    self._check(result, "listing", dir_path)
                else:
                    entries.extend(m.parse_directory(result))
                try:
                    result = self.conn.call(m.query_directory(fid, pattern, page))
                except SMBResponseException as exc:
                    result = exc
        finally:
            _close_if_alive(self.conn, fid)
        return entries

    def free_space(self, path: str) -> int | None:
        """Bytes the user may still write below directory `path`; -1 when it does not exist,
        None when the server will not tell."""
        res = self.conn.compound(
            [
                m.open_dir(
                    path, DirectoryAccessMask.FILE_READ_ATTRIBUTES, CreateDisposition.FILE_OPEN
                ),
                m.query_fs_full_size(m.RELATED_FID),
            ]
        )
        if isinstance(res[0], SMBResponseException):
            if res[0].status in RECONNECT:
                raise res[0]
            return -1 if missing(res[0]) else None
        close_quietly(self.conn, m.parse_create(res[0]).file_id)
        if isinstance(res[1], SMBResponseException):
            return None
        return m.parse_fs_full_size(res[1])


def _pieces(data: Body) -> tuple[int, Callable[[int, int], bytes]]:
    if isinstance(data, tuple):
        return data
    view = memoryview(data)
    return len(view), lambda at, n: bytes(view[at : at + n])
