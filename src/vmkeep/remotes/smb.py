"""A repository on an SMB2/SMB3 share, spoken to directly (no mount) with `smbprotocol`.

URL: ``smb://[DOMAIN;]USER@HOST[:PORT]/SHARE[/PATH]``; the password comes from the
VMKEEP_SMB_PASSWORD environment variable, never from the URL.

Why the low-level `smbprotocol` API rather than its `smbclient` convenience layer: smbclient
shares one connection per server between all threads (its pool is not guarded by a lock, and a
shared connection can run out of SMB credits under concurrent large writes), and its requests
wait for answers without a time limit. Here each thread borrows a connection of its own from a
small pool, every request has a timeout, and puts are built from the few SMB commands that
make them atomic and durable: CREATE a temp file, WRITE, FLUSH (Samba fsyncs), then rename it
over the final name with SET_INFO(FileRenameInformation).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from smbprotocol.connection import Connection  # type: ignore[import-untyped]
from smbprotocol.exceptions import (  # type: ignore[import-untyped]
    SMBAuthenticationError,
    SMBException,
    SMBResponseException,
)
from smbprotocol.file_info import (  # type: ignore[import-untyped]
    FileDispositionInformation,
    FileFsFullSizeInformation,
    FileInformationClass,
    FileRenameInformation,
)
from smbprotocol.header import NtStatus  # type: ignore[import-untyped]
from smbprotocol.open import (  # type: ignore[import-untyped]
    CreateDisposition,
    CreateOptions,
    DirectoryAccessMask,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    RequestedOplockLevel,
    ShareAccess,
    SMB2CloseRequest,
    SMB2CreateRequest,
    SMB2FlushRequest,
    SMB2QueryDirectoryRequest,
    SMB2QueryInfoRequest,
    SMB2ReadRequest,
    SMB2SetInfoRequest,
    SMB2WriteRequest,
)
from smbprotocol.session import Session  # type: ignore[import-untyped]
from smbprotocol.tree import TreeConnect  # type: ignore[import-untyped]

from vmkeep.errors import (
    NotFoundError,
    ObjectExistsError,
    RemoteError,
    RemoteFullError,
    UsageError,
    VmkeepError,
)

from .base import ObjectStat

# smbprotocol logs its worker thread's failures at ERROR; we report them as RemoteError, so
# keep Python's last-resort handler from printing them when the application set up no logging.
logging.getLogger("smbprotocol").addHandler(logging.NullHandler())

PASSWORD_ENV = "VMKEEP_SMB_PASSWORD"
DEFAULT_PORT = 445
TEMP_PREFIX = ".tmp-"

_T = TypeVar("_T")
_CREDIT_BYTES = 65536  # one SMB credit pays for 64 KiB of payload
_RELATED_FID = b"\xff" * 16  # "the handle the previous request of this compound opened"
_FILETIME_UNIX_EPOCH = 116444736000000000  # 1970-01-01 in 100 ns ticks since 1601
_DIR_ENTRY = struct.Struct("<IIqqqqqqII")  # FileDirectoryInformation without its name
_CREATE_RESPONSE = struct.Struct("<HBBIqqqqqqII16s")
_FILE_ATTRIBUTE_DIRECTORY = 0x10
_BAD_NAME_CHARS = set('\\:*?"<>|') | {chr(c) for c in range(32)}
_MAX_IDLE = 16
_WANTED_CREDITS = 512  # enough for several 8 MiB requests in flight on one connection

# NTSTATUS values smbprotocol does not name.
_STATUS_QUOTA_EXCEEDED = 0xC0000044
_STATUS_MEDIA_WRITE_PROTECTED = 0xC00000A2
_STATUS_ACCOUNT_RESTRICTION = 0xC000006E
_STATUS_INVALID_LOGON_HOURS = 0xC000006F
_STATUS_INVALID_WORKSTATION = 0xC0000070
_STATUS_ACCOUNT_DISABLED = 0xC0000072
_STATUS_ACCOUNT_EXPIRED = 0xC0000193
_STATUS_PASSWORD_MUST_CHANGE = 0xC0000224
_STATUS_ACCOUNT_LOCKED_OUT = 0xC0000234
_STATUS_NETWORK_SESSION_EXPIRED = 0xC000035C
_STATUS_INVALID_HANDLE = 0xC0000008
_STATUS_CONNECTION_DISCONNECTED = 0xC000020C
_STATUS_CONNECTION_RESET = 0xC000020D

_STATUS_NAMES: dict[int, str] = {
    v: k for k, v in vars(NtStatus).items() if k.startswith("STATUS_")
} | {
    _STATUS_QUOTA_EXCEEDED: "STATUS_QUOTA_EXCEEDED",
    _STATUS_MEDIA_WRITE_PROTECTED: "STATUS_MEDIA_WRITE_PROTECTED",
    _STATUS_ACCOUNT_DISABLED: "STATUS_ACCOUNT_DISABLED",
    _STATUS_ACCOUNT_LOCKED_OUT: "STATUS_ACCOUNT_LOCKED_OUT",
    _STATUS_NETWORK_SESSION_EXPIRED: "STATUS_NETWORK_SESSION_EXPIRED",
}
_NOT_FOUND = {
    NtStatus.STATUS_OBJECT_NAME_NOT_FOUND,
    NtStatus.STATUS_OBJECT_PATH_NOT_FOUND,
    NtStatus.STATUS_NO_SUCH_FILE,
    NtStatus.STATUS_NOT_FOUND,
    NtStatus.STATUS_DELETE_PENDING,  # being deleted: as good as gone
}
_AUTH_FAILED = {
    NtStatus.STATUS_LOGON_FAILURE,
    NtStatus.STATUS_WRONG_PASSWORD,
    NtStatus.STATUS_PASSWORD_EXPIRED,
    _STATUS_ACCOUNT_RESTRICTION,
    _STATUS_INVALID_LOGON_HOURS,
    _STATUS_INVALID_WORKSTATION,
    _STATUS_ACCOUNT_DISABLED,
    _STATUS_ACCOUNT_EXPIRED,
    _STATUS_PASSWORD_MUST_CHANGE,
    _STATUS_ACCOUNT_LOCKED_OUT,
}
# Worth another attempt; the first group also means the connection (session, tree) is gone.
_RECONNECT = {
    NtStatus.STATUS_NETWORK_NAME_DELETED,
    NtStatus.STATUS_USER_SESSION_DELETED,
    _STATUS_NETWORK_SESSION_EXPIRED,
    _STATUS_INVALID_HANDLE,
    NtStatus.STATUS_FILE_CLOSED,
    _STATUS_CONNECTION_DISCONNECTED,
    _STATUS_CONNECTION_RESET,
}
_TRANSIENT = _RECONNECT | {
    NtStatus.STATUS_INSUFFICIENT_RESOURCES,
    NtStatus.STATUS_INSUFF_SERVER_RESOURCES,
    NtStatus.STATUS_IO_TIMEOUT,
    NtStatus.STATUS_REQUEST_NOT_ACCEPTED,
    NtStatus.STATUS_SERVER_UNAVAILABLE,
    NtStatus.STATUS_SHARING_VIOLATION,  # another client holds the file for a moment
}
# Errors of the transport (socket, timeouts, smbprotocol's worker thread): drop the connection.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    SMBException,
    OSError,
    ValueError,
    EOFError,
    TimeoutError,
    KeyError,  # smbprotocol's worker meeting an answer it did not expect
)


def _status_name(status: int) -> str:
    return _STATUS_NAMES.get(status) or f"NTSTATUS 0x{status:08x}"


class _Failure(Exception):
    """One attempt failed: `error` is what the user sees if no attempt succeeds."""

    def __init__(self, error: RemoteError, *, retry: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry = retry


@dataclass(frozen=True)
class _Target:
    """Where and as whom to connect; shared by every connection of a remote."""

    host: str
    port: int
    share: str
    username: str
    password: str = field(repr=False)
    connect_timeout: float
    request_timeout: float
    require_signing: bool
    encrypt: bool | None

    @property
    def where(self) -> str:
        return f"SMB server {self.host}:{self.port}"


def _reason(exc: BaseException) -> str:
    """A one-line cause for a transport failure, without smbprotocol's noise."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low or isinstance(exc, TimeoutError):
        return "timed out"
    if "name or service not known" in low or "nodename nor servname" in low or "gaierror" in low:
        return "host name not found"
    if "reset" in low or "closed" in low or "broken pipe" in low:
        return "connection lost"
    return text


class _Conn:
    """One TCP connection, authenticated session and tree connect, used by one thread at a time."""

    def __init__(self, target: _Target) -> None:
        self.target = target
        self.reused = False
        self._timed_out = False
        self.connection = Connection(
            uuid.uuid4(),  # a GUID of its own, or Samba hands every connection to one process
            target.host,
            target.port,
            require_signing=target.require_signing,
        )
        # smbprotocol waits without a limit for session setup and tree connect answers:
        # a watchdog closes the socket, which wakes those waits with an error.
        watchdog = threading.Timer(target.connect_timeout, self._abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            self._setup()
        except SMBResponseException as exc:
            self.close()
            raise self._setup_failure(exc) from exc
        except SMBAuthenticationError as exc:
            self.close()
            raise _Failure(
                RemoteError(
                    f"authentication failed for {target.username} on {target.where}: {exc}"
                ),
                retry=False,
            ) from exc
        except _CONNECTION_ERRORS as exc:
            self.close()
            reason = "timed out" if self._timed_out else _reason(exc)
            if "guest" in str(exc):
                raise _Failure(
                    RemoteError(
                        f"authentication failed for {target.username} on {target.where}: "
                        "the server only offers a guest session"
                    ),
                    retry=False,
                ) from exc
            raise _Failure(
                RemoteError(f"cannot connect to {target.where}: {reason}"), retry=True
            ) from exc
        finally:
            watchdog.cancel()

    def _setup(self) -> None:
        t = self.target
        self.connection.connect(timeout=t.connect_timeout)
        sock = self.connection.transport._sock
        # A send to a server that stopped reading must not block forever either.
        secs = int(t.request_timeout)
        usecs = int((t.request_timeout - secs) * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", secs, usecs))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # Encrypt (SMB3) when the server can, else sign; `encrypt` True/False forces it.
        encrypt = self.connection.supports_encryption if t.encrypt is None else t.encrypt
        self.session = Session(
            self.connection,
            username=t.username,
            password=t.password,
            require_encryption=bool(encrypt),
            auth_protocol="ntlm",
        )
        self.session.connect()
        self.tree = TreeConnect(self.session, rf"\\{t.host}\{t.share}")
        self.tree.connect()
        self.sid = self.session.session_id
        self.tid = self.tree.tree_connect_id
        self.max_read = int(self.connection.max_read_size)
        self.max_write = int(self.connection.max_write_size)
        if self.connection.supports_multi_credit:
            self._ask_credits()

    def _ask_credits(self) -> None:
        """Servers start a connection with few credits; ask for enough for large writes."""
        have = self.credits()
        if have < _WANTED_CREDITS:
            self.connection.echo(
                sid=self.sid,
                timeout=int(self.target.connect_timeout) or 1,
                credit_request=_WANTED_CREDITS - have,
            )

    def _setup_failure(self, exc: SMBResponseException) -> _Failure:
        t = self.target
        status = exc.status
        if status in _AUTH_FAILED:
            hint = (
                "wrong user name or password, " if status == NtStatus.STATUS_LOGON_FAILURE else ""
            )
            return _Failure(
                RemoteError(
                    f"authentication failed for {t.username} on {t.where} "
                    f"({hint}{_status_name(status)})"
                ),
                retry=False,
            )
        if status == NtStatus.STATUS_BAD_NETWORK_NAME:
            return _Failure(
                RemoteError(f"share {t.share!r} does not exist on {t.where}"), retry=False
            )
        if status == NtStatus.STATUS_ACCESS_DENIED:
            return _Failure(
                RemoteError(f"permission denied: {t.username} may not use share {t.share!r}"),
                retry=False,
            )
        return _Failure(
            RemoteError(
                f"cannot connect to share {t.share!r} on {t.where}: {_status_name(status)}"
            ),
            retry=status in _TRANSIENT,
        )

    def _abort(self) -> None:
        self._timed_out = True
        self.close()

    def alive(self) -> bool:
        transport = self.connection.transport
        return bool(
            transport is not None and transport.connected and self.connection._t_exc is None
        )

    def close(self) -> None:
        """Drop the socket without logging off: a dead server must not make this wait."""
        with contextlib.suppress(Exception):
            if self.connection.transport is not None:
                self.connection.disconnect(close=False)

    # --- requests ---------------------------------------------------------------------------

    def credits(self) -> int:
        window = self.connection.sequence_window
        return int(window["high"] - window["low"])

    def span(self, want: int, op_max: int, spare: int = 0) -> int:
        """How many bytes one READ/WRITE may move now: the size limit and the credits we hold."""
        if not self.connection.supports_multi_credit:
            return max(1, min(want, op_max, _CREDIT_BYTES))
        return max(1, min(want, op_max, max(1, self.credits() - spare) * _CREDIT_BYTES))

    def call(self, msg: Any) -> bytes:
        """Send one request, wait (bounded) for its answer, return the answer's body."""
        req = self.connection.send(msg, sid=self.sid, tid=self.tid, credit_request=self._ask(msg))
        resp = self.connection.receive(req, timeout=self.target.request_timeout)
        return bytes(resp["data"].get_value())

    def compound(
        self, msgs: list[Any], *, related: bool = True
    ) -> list[bytes | SMBResponseException]:
        """One round trip for several requests; each answer is a body or its status error.
        In a related compound every request uses the handle the first one opened."""
        reqs = self.connection.send_compound(msgs, self.sid, self.tid, related=related)
        out: list[bytes | SMBResponseException] = []
        for req in reqs:
            try:
                resp = self.connection.receive(req, timeout=self.target.request_timeout)
                out.append(bytes(resp["data"].get_value()))
            except SMBResponseException as exc:
                out.append(exc)
        return out

    def _ask(self, msg: Any) -> int | None:
        """Credits to ask for with a request: what it costs, plus a top-up to the target."""
        if not self.connection.supports_multi_credit:
            return None
        charge = int(self.connection._calculate_credit_charge(msg))
        return charge + max(0, _WANTED_CREDITS - self.credits())


def _ok(result: bytes | SMBResponseException) -> bytes:
    if isinstance(result, SMBResponseException):
        raise result
    return result


def _create(
    path: str,
    access: int,
    disposition: int,
    options: int,
    *,
    share: int = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_DELETE,
    directory: bool = False,
) -> Any:
    req = SMB2CreateRequest()
    req["requested_oplock_level"] = RequestedOplockLevel.SMB2_OPLOCK_LEVEL_NONE
    req["impersonation_level"] = ImpersonationLevel.Impersonation
    req["desired_access"] = access
    req["file_attributes"] = (
        FileAttributes.FILE_ATTRIBUTE_DIRECTORY
        if directory
        else FileAttributes.FILE_ATTRIBUTE_NORMAL
    )
    req["share_access"] = share
    req["create_disposition"] = disposition
    req["create_options"] = options | (
        CreateOptions.FILE_DIRECTORY_FILE if directory else CreateOptions.FILE_NON_DIRECTORY_FILE
    )
    req["buffer_path"] = path.encode("utf-16-le") if path else b"\x00\x00"
    return req


@dataclass(frozen=True)
class _Opened:
    file_id: bytes
    size: int
    mtime: float
    is_dir: bool


def _filetime(value: int) -> float:
    return (value - _FILETIME_UNIX_EPOCH) / 1e7


def _parse_create(body: bytes) -> _Opened:
    f = _CREATE_RESPONSE.unpack_from(body)
    # fields: size, oplock, flags, action, ctime, atime, mtime, change, alloc, eof, attrs, _, fid
    return _Opened(file_id=f[12], size=f[9], mtime=_filetime(f[6]), is_dir=bool(f[10] & 0x10))


def _close(file_id: bytes) -> Any:
    req = SMB2CloseRequest()
    req["file_id"] = file_id
    return req


def _write_req(file_id: bytes, offset: int, data: bytes) -> Any:
    req = SMB2WriteRequest()
    req["length"] = len(data)
    req["offset"] = offset
    req["file_id"] = file_id
    req["buffer"] = data
    return req


def _read_req(file_id: bytes, offset: int, length: int) -> Any:
    req = SMB2ReadRequest()
    req["length"] = length
    req["offset"] = offset
    req["minimum_count"] = 0
    req["file_id"] = file_id
    req["padding"] = b"\x50"
    return req


def _read_data(body: bytes) -> bytes:
    data_offset, data_length = body[2], struct.unpack_from("<I", body, 4)[0]
    start = data_offset - 64  # the offset counts from the start of the SMB2 header
    return body[start : start + data_length]


def _set_info(file_id: bytes, info: Any) -> Any:
    req = SMB2SetInfoRequest()
    req["info_type"] = info.INFO_TYPE
    req["file_info_class"] = info.INFO_CLASS
    req["file_id"] = file_id
    req["buffer"] = info
    return req


def _query_directory(file_id: bytes, pattern: str, page_bytes: int) -> Any:
    req = SMB2QueryDirectoryRequest()
    req["file_information_class"] = FileInformationClass.FILE_DIRECTORY_INFORMATION
    req["flags"] = 0
    req["file_index"] = 0
    req["file_id"] = file_id
    req["output_buffer_length"] = page_bytes
    req["buffer"] = pattern.encode("utf-16-le")
    return req


def _parse_directory(body: bytes) -> Iterator[tuple[str, int, float, bool]]:
    """(name, size, mtime, is_dir) of each FileDirectoryInformation entry of one page."""
    offset, length = struct.unpack_from("<HI", body, 2)
    buf = memoryview(body)[offset - 64 : offset - 64 + length]
    pos = 0
    while True:
        nxt, _idx, _c, _a, mtime, _ch, eof, _al, attrs, name_len = _DIR_ENTRY.unpack_from(buf, pos)
        start = pos + _DIR_ENTRY.size
        name = bytes(buf[start : start + name_len]).decode("utf-16-le")
        if name not in (".", ".."):
            yield name, eof, _filetime(mtime), bool(attrs & _FILE_ATTRIBUTE_DIRECTORY)
        if not nxt:
            return
        pos += nxt


class _Pool:
    """Idle connections; a thread borrows one for a whole operation, so none is shared."""

    def __init__(self, target: _Target) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._idle: list[_Conn] = []
        self._closed = False

    def acquire(self) -> _Conn:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.alive():
                    conn.reused = True
                    return conn
                conn.close()
        return _Conn(self.target)  # outside the lock: connecting takes a round trip or four

    def release(self, conn: _Conn, healthy: bool) -> None:
        if healthy and conn.alive():
            with self._lock:
                if not self._closed and len(self._idle) < _MAX_IDLE:
                    self._idle.append(conn)
                    return
        conn.close()

    def drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.drop_idle()


class SmbRemote:
    """Objects are files on an SMB share, below an optional directory of it.

    Safe for concurrent use: each operation borrows its own connection. Transient failures
    (lost connection, timeouts, server busy) are retried with exponential backoff for at most
    `retry_time` seconds, then raise RemoteError."""

    def __init__(
        self,
        host: str,
        share: str,
        *,
        username: str,
        password: str,
        port: int = DEFAULT_PORT,
        path: str = "",
        connect_timeout: float = 10.0,
        request_timeout: float = 60.0,
        retry_time: float = 30.0,
        list_page_bytes: int = 65536,
        require_signing: bool = True,
        encrypt: bool | None = None,
    ) -> None:
        parts = [p for p in path.replace("\\", "/").split("/") if p]
        if any(p in (".", "..") or set(p) & _BAD_NAME_CHARS for p in parts):
            raise UsageError(f"invalid path {path!r} in the SMB share")
        self._root = "\\".join(parts)
        self._target = _Target(
            host=host,
            port=port,
            share=share,
            username=username,
            password=password,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            require_signing=require_signing,
            encrypt=encrypt,
        )
        self._retry_time = retry_time
        self._page_bytes = max(1024, list_page_bytes)
        self.list_pages = 0  # QUERY_DIRECTORY round trips so far (tests check paging with it)
        host_part = f"[{host}]" if ":" in host else host
        port_part = "" if port == DEFAULT_PORT else f":{port}"
        tail = "/" + "/".join(parts) if parts else ""
        self.url = f"smb://{username}@{host_part}{port_part}/{share}{tail}"
        self._pool = _Pool(self._target)
        self._finalizer = weakref.finalize(self, self._pool.close)

    def close(self) -> None:
        """Disconnect every pooled connection (also done when the remote is garbage collected)."""
        self._finalizer()

    # --- names ------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        parts = name.split("/")
        if not name or any(
            p in ("", ".", "..") or p.startswith(TEMP_PREFIX) or set(p) & _BAD_NAME_CHARS
            for p in parts
        ):
            raise RemoteError(f"invalid object name {name!r}")
        return self._join(self._root, "\\".join(parts))

    @staticmethod
    def _join(a: str, b: str) -> str:
        return f"{a}\\{b}" if a and b else a or b

    def _where(self, path: str) -> str:
        return f"{self.url}/{path.replace(chr(92), '/')}" if path else self.url

    # --- retries and errors -----------------------------------------------------------------

    def _run(self, fn: Callable[[_Conn], _T]) -> _T:
        """Run `fn` on a borrowed connection, retrying transient failures with backoff."""
        start = time.monotonic()
        delay = 0.25
        while True:
            try:
                conn = self._pool.acquire()
            except _Failure as failure:
                err, retry, quick = failure.error, failure.retry, False
            else:
                try:
                    result = fn(conn)
                except VmkeepError:
                    self._pool.release(conn, healthy=True)
                    raise
                except _Failure as failure:
                    self._pool.release(conn, healthy=True)
                    err, retry, quick = failure.error, failure.retry, False
                except SMBResponseException as exc:
                    healthy = exc.status not in _RECONNECT
                    self._pool.release(conn, healthy=healthy)
                    err = RemoteError(f"{self._target.where} failed: {_status_name(exc.status)}")
                    retry, quick = exc.status in _TRANSIENT, not healthy and conn.reused
                except _CONNECTION_ERRORS as exc:
                    self._pool.release(conn, healthy=False)
                    err = RemoteError(
                        f"lost the connection to {self._target.where}: {_reason(exc)}"
                    )
                    retry, quick = True, conn.reused
                    if conn.reused:
                        self._pool.drop_idle()  # the server restarted? the others are stale too
                except Exception as exc:
                    self._pool.release(conn, healthy=False)
                    raise RemoteError(f"SMB client error on {self._target.where}: {exc}") from exc
                else:
                    self._pool.release(conn, healthy=True)
                    return result
            if not retry:
                raise err
            if quick:  # a pooled connection had gone stale: reconnect at once
                continue
            if time.monotonic() - start + delay > self._retry_time:
                raise RemoteError(f"{err.message} (gave up after {time.monotonic() - start:.0f} s)")
            time.sleep(delay)
            delay = min(delay * 2, 8.0)

    def _status_error(self, exc: SMBResponseException, action: str, path: str) -> _Failure:
        """Turn a status into the user's error for `action` ("writing", ...) on `path`."""
        status = exc.status
        where = self._where(path)
        if status in (NtStatus.STATUS_DISK_FULL, _STATUS_QUOTA_EXCEEDED):
            return _Failure(
                RemoteFullError(f"remote is full: no space left {action} {where}"), retry=False
            )
        if status == _STATUS_MEDIA_WRITE_PROTECTED:
            return _Failure(
                RemoteError(f"remote is read-only: cannot {action.split()[0]} {where}"),
                retry=False,
            )
        if status == NtStatus.STATUS_ACCESS_DENIED:
            return _Failure(RemoteError(f"permission denied {action} {where}"), retry=False)
        if status in _NOT_FOUND:
            return _Failure(RemoteError(f"not found {action} {where}"), retry=False)
        return _Failure(
            RemoteError(f"{_status_name(status)} {action} {where}"), retry=status in _TRANSIENT
        )

    def _check(self, result: bytes | SMBResponseException, action: str, path: str) -> bytes:
        if isinstance(result, SMBResponseException):
            if result.status in _RECONNECT:
                raise result  # let _run drop the connection
            raise self._status_error(result, action, path) from result
        return result

    # --- helpers on one connection ----------------------------------------------------------

    def _mkdirs(self, conn: _Conn, path: str) -> None:
        """Create `path` and its missing parents (FILE_OPEN_IF: racing creators all win)."""
        if not path:
            return
        msgs = [
            _create(
                path,
                DirectoryAccessMask.FILE_READ_ATTRIBUTES,
                CreateDisposition.FILE_OPEN_IF,
                0,
                share=ShareAccess.FILE_SHARE_READ
                | ShareAccess.FILE_SHARE_WRITE
                | ShareAccess.FILE_SHARE_DELETE,
                directory=True,
            ),
            _close(_RELATED_FID),
        ]
        res = conn.compound(msgs)
        if (
            isinstance(res[0], SMBResponseException)
            and res[0].status == NtStatus.STATUS_OBJECT_PATH_NOT_FOUND
        ):
            self._mkdirs(conn, path.rpartition("\\")[0])
            res = conn.compound(msgs)
        self._check(res[0], "creating directory", path)

    def _discard_open(self, conn: _Conn, file_id: bytes) -> None:
        """Delete a temp file through its open handle and close it; best effort."""
        with contextlib.suppress(SMBResponseException):
            info = FileDispositionInformation()
            info["delete_pending"] = True
            conn.call(_set_info(file_id, info))
        with contextlib.suppress(SMBResponseException):
            conn.call(_close(file_id))

    def _unlink(self, conn: _Conn, path: str) -> bool:
        """Delete a file by path; False when it was not there."""
        res = conn.compound(
            [
                _create(
                    path,
                    FilePipePrinterAccessMask.DELETE
                    | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES,
                    CreateDisposition.FILE_OPEN,
                    CreateOptions.FILE_DELETE_ON_CLOSE,
                    share=ShareAccess.FILE_SHARE_READ
                    | ShareAccess.FILE_SHARE_WRITE
                    | ShareAccess.FILE_SHARE_DELETE,
                ),
                _close(_RELATED_FID),
            ]
        )
        if isinstance(res[0], SMBResponseException) and res[0].status in _NOT_FOUND:
            return False
        self._check(res[0], "deleting", path)
        return True

    def _unlinker(self, path: str) -> Callable[[_Conn], bool]:
        return lambda conn: self._unlink(conn, path)

    # --- the Remote interface ---------------------------------------------------------------

    def put(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        """Temp file, FLUSH (the server fsyncs), then rename: readers never see a partial
        object. Without `overwrite` the rename refuses an existing name atomically."""
        path = self._path(name)
        state = {"renamed": False}  # a rename whose answer was lost may have happened

        def attempt(conn: _Conn) -> None:
            maybe_done = state["renamed"]
            try:
                self._put_once(conn, path, name, data, overwrite, state)
            except ObjectExistsError:
                # Our own earlier attempt may have renamed before the connection broke.
                if maybe_done and self._read(conn, path, name, 0, None) == data:
                    return
                raise

        self._run(attempt)

    def _put_once(
        self,
        conn: _Conn,
        path: str,
        name: str,
        data: bytes,
        overwrite: bool,
        state: dict[str, bool],
    ) -> None:
        parent = path.rpartition("\\")[0]
        tmp = self._join(parent, f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}")
        view = memoryview(data)
        first = conn.span(len(view), conn.max_write, spare=1)
        create = _create(
            tmp,
            FilePipePrinterAccessMask.FILE_WRITE_DATA
            | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES
            | FilePipePrinterAccessMask.DELETE,
            CreateDisposition.FILE_CREATE,
            0,
        )
        msgs = [create, _write_req(_RELATED_FID, 0, bytes(view[:first]))]
        res = conn.compound(msgs)
        if (
            isinstance(res[0], SMBResponseException)
            and res[0].status == NtStatus.STATUS_OBJECT_PATH_NOT_FOUND
            and parent
        ):
            self._mkdirs(conn, parent)
            res = conn.compound(msgs)
        opened = _parse_create(self._check(res[0], "writing", path))
        fid = opened.file_id
        try:
            written = struct.unpack_from("<I", self._check(res[1], "writing", path), 4)[0]
            while written < len(view):
                n = conn.span(len(view) - written, conn.max_write)
                body = conn.call(_write_req(fid, written, bytes(view[written : written + n])))
                written += struct.unpack_from("<I", body, 4)[0]
            flush = SMB2FlushRequest()
            flush["file_id"] = fid
            conn.call(flush)
        except SMBResponseException as exc:
            self._discard_open(conn, fid)
            if exc.status in _RECONNECT:
                raise
            raise self._status_error(exc, "writing", path) from exc
        except BaseException:
            if conn.alive():
                self._discard_open(conn, fid)
            raise
        rename = FileRenameInformation()
        rename["replace_if_exists"] = overwrite
        rename["root_directory"] = 0
        rename["file_name"] = path
        state["renamed"] = True
        res = conn.compound([_set_info(fid, rename), _close(fid)])
        if not isinstance(res[0], SMBResponseException):
            state["renamed"] = False
            return
        state["renamed"] = False
        # The rename failed: the temp file must go. Whether the CLOSE ran after a failed
        # request of a related compound differs between servers; clean up either way.
        if isinstance(res[1], SMBResponseException):
            self._discard_open(conn, fid)
        else:
            with contextlib.suppress(SMBResponseException):
                self._unlink(conn, tmp)
        if res[0].status == NtStatus.STATUS_OBJECT_NAME_COLLISION:
            if overwrite:  # replace_if_exists cannot replace a directory
                raise RemoteError(f"cannot write {self._where(path)}: it is a directory")
            raise ObjectExistsError(f"object {name} already exists")
        self._check(res[0], "writing", path)

    def flush(self) -> None:
        """Nothing to do: each put FLUSHes its file before the rename, so it is durable (as
        far as the server's fsync goes) when put returns."""

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        if offset < 0 or (length is not None and length < 0):
            raise RemoteError(f"invalid range {offset}+{length} of {name}")

        return self._run(lambda conn: self._read(conn, path, name, offset, length))

    def _read(self, conn: _Conn, path: str, name: str, offset: int, length: int | None) -> bytes:
        """One object or a range of it: [CREATE + READ] in one round trip, more READs for
        what one READ could not carry, then CLOSE."""
        want = conn.max_read if length is None else length
        first = conn.span(max(want, 1), conn.max_read, spare=1)
        res = conn.compound(
            [
                _create(
                    path,
                    FilePipePrinterAccessMask.FILE_READ_DATA
                    | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES,
                    CreateDisposition.FILE_OPEN,
                    0,
                    share=ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_DELETE,
                ),
                _read_req(_RELATED_FID, offset, first),
            ]
        )
        head = res[0]
        if isinstance(head, SMBResponseException) and (
            head.status in _NOT_FOUND or head.status == NtStatus.STATUS_FILE_IS_A_DIRECTORY
        ):
            raise NotFoundError(f"object {name} not found in {self.url}")
        opened = _parse_create(self._check(head, "reading", path))
        try:
            end = opened.size if length is None else min(opened.size, offset + length)
            chunks: list[bytes] = []
            got = offset
            if isinstance(res[1], SMBResponseException):
                if res[1].status != NtStatus.STATUS_END_OF_FILE:
                    self._check(res[1], "reading", path)
            else:
                part = _read_data(res[1])
                chunks.append(part)
                got += len(part)
            while got < end:
                n = conn.span(end - got, conn.max_read)
                part = _read_data(conn.call(_read_req(opened.file_id, got, n)))
                if not part:
                    break
                chunks.append(part)
                got += len(part)
        finally:
            if conn.alive():
                with contextlib.suppress(SMBResponseException):
                    conn.call(_close(opened.file_id))
        data = b"".join(chunks)
        return data if length is None else data[:length]

    def stat(self, name: str) -> ObjectStat | None:
        path = self._path(name)

        def attempt(conn: _Conn) -> ObjectStat | None:
            res = conn.compound(
                [
                    _create(
                        path,
                        FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES,
                        CreateDisposition.FILE_OPEN,
                        0,
                        share=ShareAccess.FILE_SHARE_READ
                        | ShareAccess.FILE_SHARE_WRITE
                        | ShareAccess.FILE_SHARE_DELETE,
                    ),
                    _close(_RELATED_FID),
                ]
            )
            head = res[0]
            if isinstance(head, SMBResponseException) and (
                head.status in _NOT_FOUND or head.status == NtStatus.STATUS_FILE_IS_A_DIRECTORY
            ):
                return None
            opened = _parse_create(self._check(head, "reading", path))
            return ObjectStat(name, opened.size, opened.mtime)

        return self._run(attempt)

    def _scan(self, dir_path: str, pattern: str) -> list[tuple[str, int, float, bool]]:
        """Every entry of one directory, page by page; empty when it does not exist."""

        def attempt(conn: _Conn) -> list[tuple[str, int, float, bool]]:
            page = min(self._page_bytes, conn.max_read)
            res = conn.compound(
                [
                    _create(
                        dir_path,
                        DirectoryAccessMask.FILE_LIST_DIRECTORY
                        | DirectoryAccessMask.FILE_READ_ATTRIBUTES,
                        CreateDisposition.FILE_OPEN,
                        0,
                        share=ShareAccess.FILE_SHARE_READ
                        | ShareAccess.FILE_SHARE_WRITE
                        | ShareAccess.FILE_SHARE_DELETE,
                        directory=True,
                    ),
                    _query_directory(_RELATED_FID, pattern, page),
                ]
            )
            head = res[0]
            if isinstance(head, SMBResponseException) and (
                head.status in _NOT_FOUND or head.status == NtStatus.STATUS_NOT_A_DIRECTORY
            ):
                return []
            fid = _parse_create(self._check(head, "listing", dir_path)).file_id
            entries: list[tuple[str, int, float, bool]] = []
            try:
                result = res[1]
                while True:
                    self.list_pages += 1
                    if isinstance(result, SMBResponseException):
                        if result.status in (
                            NtStatus.STATUS_NO_MORE_FILES,
                            NtStatus.STATUS_NO_SUCH_FILE,
                        ):
                            break
                        self._check(result, "listing", dir_path)
                    else:
                        entries.extend(_parse_directory(result))
                    try:
                        result = conn.call(_query_directory(fid, pattern, page))
                    except SMBResponseException as exc:
                        result = exc
            finally:
                if conn.alive():
                    with contextlib.suppress(SMBResponseException):
                        conn.call(_close(fid))
            return entries

        return self._run(attempt)

    def list(self, prefix: str) -> Iterator[ObjectStat]:
        """Walks only the directories the prefix can match; one directory in memory at a time."""
        head, _, tail = prefix.rpartition("/")
        base = head + "/" if head else ""
        if head and any(p in ("", ".", "..") for p in head.split("/")):
            return
        start = self._join(self._root, head.replace("/", "\\"))
        stack = [(start, base, tail + "*")]
        while stack:
            dir_path, rel, pattern = stack.pop()
            for entry_name, size, mtime, is_dir in self._scan(dir_path, pattern):
                name = rel + entry_name
                if is_dir:
                    if (name + "/").startswith(prefix) or prefix.startswith(name + "/"):
                        stack.append((self._join(dir_path, entry_name), name + "/", "*"))
                elif not entry_name.startswith(TEMP_PREFIX) and name.startswith(prefix):
                    yield ObjectStat(name, size, mtime)

    def delete(self, name: str) -> None:
        path = self._path(name)

        def attempt(conn: _Conn) -> None:
            self._unlink(conn, path)

        self._run(attempt)

    def purge_incomplete(self, older_than: float) -> int:
        """Remove temp files of dead writers older than `older_than` seconds (by the server's
        modification time: keep `older_than` well above any clock skew)."""
        limit = time.time() - older_than
        removed = 0
        stack = [self._root]
        while stack:
            dir_path = stack.pop()
            for entry_name, _size, mtime, is_dir in self._scan(dir_path, "*"):
                path = self._join(dir_path, entry_name)
                if is_dir:
                    stack.append(path)
                elif entry_name.startswith(TEMP_PREFIX) and mtime < limit:
                    removed += self._run(self._unlinker(path))
        return removed

    def free_space(self) -> int | None:
        """Bytes the user may still write, from FileFsFullSizeInformation; None when the
        server will not tell."""

        def query(conn: _Conn, path: str) -> int | None:
            info = SMB2QueryInfoRequest()
            info["info_type"] = FileFsFullSizeInformation.INFO_TYPE
            info["file_info_class"] = FileFsFullSizeInformation.INFO_CLASS
            info["file_id"] = _RELATED_FID
            info["output_buffer_length"] = 32
            res = conn.compound(
                [
                    _create(
                        path,
                        DirectoryAccessMask.FILE_READ_ATTRIBUTES,
                        CreateDisposition.FILE_OPEN,
                        0,
                        share=ShareAccess.FILE_SHARE_READ
                        | ShareAccess.FILE_SHARE_WRITE
                        | ShareAccess.FILE_SHARE_DELETE,
                        directory=True,
                    ),
                    info,
                ]
            )
            if isinstance(res[0], SMBResponseException):
                if res[0].status in _RECONNECT:
                    raise res[0]
                return -1 if res[0].status in _NOT_FOUND else None
            fid = _parse_create(res[0]).file_id
            with contextlib.suppress(SMBResponseException):
                conn.call(_close(fid))
            if isinstance(res[1], SMBResponseException):
                return None
            body = res[1]
            offset, length = struct.unpack_from("<HI", body, 2)
            buf = body[offset - 64 : offset - 64 + length]
            if len(buf) < 32:
                return None
            _total, caller_avail, _actual, sectors, sector_bytes = struct.unpack_from("<qqqII", buf)
            return int(caller_avail * sectors * sector_bytes)

        def attempt(conn: _Conn) -> int | None:
            got = query(conn, self._root)
            if got == -1:  # the repository's directory does not exist yet: ask the share
                got = query(conn, "")
            return None if got is None or got < 0 else got

        return self._run(attempt)


def open_smb(url: str) -> SmbRemote:
    """Parse ``smb://[DOMAIN;]USER@HOST[:PORT]/SHARE[/PATH]``; the password comes from
    VMKEEP_SMB_PASSWORD so that it never lands in configuration or logs."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("smb", "cifs"):
        raise UsageError(f"not an SMB URL: {url!r} (expected smb://USER@HOST/SHARE[/PATH])")
    if parts.password is not None:
        raise UsageError(f"do not put the SMB password in the URL; set {PASSWORD_ENV} instead")
    if parts.query or parts.fragment:
        raise UsageError(f"unexpected '?' or '#' in SMB URL {url!r}")
    user = unquote(parts.username or "")
    if not user:
        raise UsageError(f"SMB URL {url!r} needs a user: smb://USER@HOST/SHARE[/PATH]")
    domain, _, name = user.rpartition(";")
    username = f"{domain}\\{name}" if domain else name
    host = parts.hostname
    if not host:
        raise UsageError(f"SMB URL {url!r} has no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise UsageError(f"invalid port in SMB URL {url!r}") from exc
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if not segments:
        raise UsageError(f"SMB URL {url!r} names no share: smb://USER@HOST/SHARE[/PATH]")
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        raise UsageError(f"set {PASSWORD_ENV} to the password of {username} on {host}")
    remote = SmbRemote(
        host,
        segments[0],
        username=username,
        password=password,
        port=port,
        path="/".join(segments[1:]),
    )
    if domain:  # keep the URL the user wrote (DOMAIN;USER), without secrets
        remote.url = remote.url.replace(f"smb://{username}@", f"smb://{domain};{name}@", 1)
    return remote
