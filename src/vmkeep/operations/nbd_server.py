"""`vmkeep serve-nbd`: one disk of a restore point, read-only over NBD, until stopped.

A server of vmkeep's own rather than nbdkit's Python plugin: the plugin runs in nbdkit's
embedded interpreter (Debian's python3, not vmkeep's venv), so vmkeep's code and its
dependencies would have to be found from there; the protocol subset a read-only export needs
is small (nbd_protocol.py). Each client gets a thread that handles its requests in order;
reads go through one shared PointDisk (thread-safe pread, LRU of decoded chunks, read-ahead),
so memory is bounded by the cache plus one request (at most 32 MiB) per client, and at most
MAX_CLIENTS clients are served (the next ones get a clear refusal during the handshake).
Block status (base:allocation) reports the index's zero chunks as holes, so `qemu-img
convert` and `nbdcopy` skip them without reading. Writes, trims and zeroing get EPERM."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from vmkeep.errors import UsageError, VmkeepError
from vmkeep.repository.format import ZERO_ID

from . import nbd_protocol as p
from .point_disk import PointDisk

MAX_CLIENTS = 16
MAX_DESCRIPTORS = 4096  # per block status reply: the client asks again for the rest
ACCEPT_POLL = 0.2  # seconds between checks of the stop event


@dataclass
class Listen:
    """Where to listen: a Unix socket path, or a TCP address and port (0: any free port)."""

    socket_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 10809
    owner: tuple[int, int] | None = None  # (uid, gid) of the socket: e.g. QEMU's user


@dataclass
class ServeStats:
    clients: int = 0
    refused: int = 0
    requests: int = 0
    bytes_read: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class NbdServer:
    """Serves `disk` (named `name`) at `listen` until `stop()`; see `serve`."""

    def __init__(self, disk: PointDisk, name: str, listen: Listen) -> None:
        self.disk = disk
        self.name = name
        self.listen = listen
        self.stats = ServeStats()
        self._stop = threading.Event()
        self._clients: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self._lock = threading.Lock()
        self._sock = self._bind()

    # -- listening ----------------------------------------------------------------

    def _bind(self) -> socket.socket:
        if self.listen.socket_path is not None:
            return _bind_unix(self.listen.socket_path, self.listen.owner)
        try:
            infos = socket.getaddrinfo(
                self.listen.host, self.listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise UsageError(f"cannot listen on {self.listen.host}: {exc.strerror}") from None
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(MAX_CLIENTS)
        except OSError as exc:
            sock.close()
            where = f"{self.listen.host}:{self.listen.port}"
            raise VmkeepError(f"cannot listen on {where}: {exc.strerror}") from None
        return sock

    @property
    def uri(self) -> str:
        """The address in the form qemu and libnbd take (nbd+unix:// or nbd://)."""
        if self.listen.socket_path is not None:
            return f"nbd+unix:///{self.name}?socket={self.listen.socket_path}"
        host, port = self._sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"nbd://{shown}:{port}/{self.name}"

    def stop(self) -> None:
        """Ask `serve` to end (from a signal handler or another thread)."""
        self._stop.set()

    def serve(self) -> ServeStats:
        """Accept clients until stopped; then end every connection and remove the socket."""
        self._sock.settimeout(ACCEPT_POLL)
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    if self._stop.is_set():
                        break
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                        continue
                    raise
                self._start_client(conn)
        finally:
            self._shutdown()
        return self.stats

    def _start_client(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            busy = len(self._clients) >= MAX_CLIENTS
            thread = threading.Thread(target=self._client, args=(conn, busy), daemon=True)
            self._clients[id(thread)] = (conn, thread)
        thread.start()

    def _shutdown(self) -> None:
        self._sock.close()
        if self.listen.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen.socket_path)
        with self._lock:
            clients = list(self._clients.values())
        for conn, _ in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, thread in clients:
            thread.join(timeout=10)

    # -- one client ---------------------------------------------------------------

    def _client(self, conn: socket.socket, busy: bool) -> None:
        session = p.Session(names=(self.name,))
        if busy:
            session.limit_reason = f"vmkeep serves at most {MAX_CLIENTS} clients at once"
        try:
            with conn:
                if p.negotiate(conn, session, self.disk.size) and not busy:
                    with self.stats.lock:
                        self.stats.clients += 1
                    self._transmission(conn, session)
        except (p.ProtocolError, OSError):
            pass  # the client left or broke the protocol: only its connection ends
        finally:
            if busy:
                with self.stats.lock:
                    self.stats.refused += 1
            with self._lock:
                self._clients.pop(id(threading.current_thread()), None)

    def _transmission(self, conn: socket.socket, session: p.Session) -> None:
        while not self._stop.is_set():
            magic, flags, kind, cookie, offset, length = p.REQUEST.unpack(
                p.recv_exact(conn, p.REQUEST.size)
            )
            if magic != p.REQUEST_MAGIC:
                raise p.ProtocolError("bad request magic")
            with self.stats.lock:
                self.stats.requests += 1
            if kind == p.CMD_DISC:
                return
            if kind == p.CMD_WRITE:
                if length > p.MAX_PAYLOAD:
                    raise p.ProtocolError("write larger than the maximum payload")
                p.discard(conn, length)
            reply = self._answer(session, kind, flags, cookie, offset, length)
            for part in reply:
                conn.sendall(part)

    def _answer(
        self, session: p.Session, kind: int, flags: int, cookie: int, offset: int, length: int
    ) -> list[bytes]:
        if kind in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            return self._error(session, cookie, p.EPERM, "read-only export")
        if kind == p.CMD_FLUSH:
            return self._ok(session, cookie)
        if offset + length > self.disk.size:
            return self._error(session, cookie, p.EINVAL, "request past the end of the disk")
        if kind == p.CMD_READ and length > p.MAX_PAYLOAD:
            return self._error(
                session, cookie, p.EINVAL, f"read of more than {p.MAX_PAYLOAD} bytes"
            )
        if kind == p.CMD_CACHE:
            return self._ok(session, cookie)
        if kind == p.CMD_READ:
            return self._read(session, cookie, offset, length)
        if kind == p.CMD_BLOCK_STATUS and session.allocation and length:
            one = bool(flags & p.CMD_FLAG_REQ_ONE)
            return [self._block_status(cookie, offset, length, one)]
        return self._error(session, cookie, p.EINVAL, f"command {kind} is not supported")

    def _read(self, session: p.Session, cookie: int, offset: int, length: int) -> list[bytes]:
        if session.structured and length and self._all_holes(offset, length):
            payload = struct.pack(">QI", offset, length)
            head = p.STRUCTURED.pack(
                p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_OFFSET_HOLE, cookie, 12
            )
            return [head + payload]
        try:
            data = self.disk.pread(offset, length)
        except VmkeepError as exc:
            print(f"warning: read of {length} bytes at {offset}: {exc.message}", file=sys.stderr)
            return self._error(session, cookie, p.EIO, exc.message)
        with self.stats.lock:
            self.stats.bytes_read += len(data)
        if not session.structured:
            return [p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie), data]
        head = p.STRUCTURED.pack(
            p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_OFFSET_DATA, cookie, 8 + len(data)
        )
        return [head + struct.pack(">Q", offset), data]

    def _all_holes(self, offset: int, length: int) -> bool:
        cs = self.disk.chunk_size
        index = self.disk.index
        return all(
            index.chunk_id(i) == ZERO_ID
            for i in range(offset // cs, (offset + length - 1) // cs + 1)
        )

    def _block_status(self, cookie: int, offset: int, length: int, one: bool) -> bytes:
        """Descriptors of data and holes from `offset`, merged across chunks of one kind."""
        cs = self.disk.chunk_size
        index = self.disk.index
        end = offset + length
        descriptors: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(descriptors) < (1 if one else MAX_DESCRIPTORS):
            i = pos // cs
            hole = index.chunk_id(i) == ZERO_ID
            stop = min((i + 1) * cs, end)
            while stop < end and (index.chunk_id(stop // cs) == ZERO_ID) == hole:
                stop = min(stop + cs, end)
            state = p.STATE_HOLE | p.STATE_ZERO if hole else 0
            descriptors.append((stop - pos, state))
            pos = stop
        payload = struct.pack(">I", p.ALLOCATION_ID) + b"".join(
            struct.pack(">II", n, s) for n, s in descriptors
        )
        head = p.STRUCTURED.pack(
            p.STRUCTURED_REPLY_MAGIC,
            p.REPLY_FLAG_DONE,
            p.REPLY_BLOCK_STATUS,
            cookie,
            len(payload),
        )
        return head + payload

    @staticmethod
    def _ok(session: p.Session, cookie: int) -> list[bytes]:
        if not session.structured:
            return [p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie)]
        return [p.STRUCTURED.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, 0, cookie, 0)]

    @staticmethod
    def _error(session: p.Session, cookie: int, code: int, message: str) -> list[bytes]:
        if not session.structured:
            return [p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, code, cookie)]
        return [p.structured_error(cookie, code, message)]


def _bind_unix(path: Path, owner: tuple[int, int] | None) -> socket.socket:
    """A Unix socket only its owner can connect to (the disk's data is behind it): this
    process's user, or `owner`. A stale socket nobody listens on is replaced; anything else
    at the path is refused."""
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
        if owner is not None:
            os.chown(path, *owner)
        sock.listen(MAX_CLIENTS)
    except OSError as exc:
        sock.close()
        raise VmkeepError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    return sock


def _remove_stale(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise VmkeepError(f"cannot listen on {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)  # left by a server that died: nobody listens
        return
    except OSError as exc:
        raise VmkeepError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise UsageError(f"{path}: another server listens on this socket")
