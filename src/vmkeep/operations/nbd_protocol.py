"""The NBD protocol as vmkeep's read-only export speaks it: fixed newstyle handshake, option
haggling (GO/INFO, structured replies, the base:allocation meta context) and the wire formats
of requests and replies. Written from the protocol description in the NBD project's
doc/proto.md; nbd_server.py drives it."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
# transmission flags: has flags, read only, block status works across connections (multi-conn)
TRANSMISSION_FLAGS = 1 | 2 | (1 << 8)

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = 0x80000001, 0x80000002, 0x80000003
REP_ERR_UNKNOWN = 0x80000006
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
CMD_FLAG_REQ_ONE = 1 << 3
REPLY_FLAG_DONE = 1
REPLY_OFFSET_DATA, REPLY_OFFSET_HOLE, REPLY_BLOCK_STATUS, REPLY_ERROR = 1, 2, 5, (1 << 15) + 1
STATE_HOLE, STATE_ZERO = 1, 2
EPERM, EIO, EINVAL, ENOTSUP = 1, 5, 22, 95

BASE_ALLOCATION = "base:allocation"
ALLOCATION_ID = 1  # the id this server gives the base:allocation context
MAX_OPTION = 64 << 10  # longer option data ends the connection: no client needs more
MAX_NAME = 4096  # the protocol's limit on export and context names
MAX_PAYLOAD = 32 << 20  # the protocol's default maximum request size
PREFERRED_BLOCK = 64 << 10

REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED = struct.Struct(">IHHQI")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")


class ProtocolError(Exception):
    """The client broke the protocol (or left): the connection ends, the server goes on."""


@dataclass
class Session:
    """What one connection negotiated."""

    structured: bool = False
    allocation: bool = False  # base:allocation selected for block status
    export_name: str = ""
    limit_reason: str | None = None  # set when the server refuses this client
    names: tuple[str, ...] = field(default_factory=tuple)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes, or ProtocolError when the client goes away first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ProtocolError("client closed the connection")
        got += k
    return bytes(buf)


def discard(sock: socket.socket, n: int) -> None:
    """Read and drop n bytes (a refused write's payload) in bounded pieces."""
    while n > 0:
        n -= len(recv_exact(sock, min(n, 1 << 20)))


def negotiate(sock: socket.socket, session: Session, size: int) -> bool:
    """The handshake and option haggling. True: go on to transmission; False: the client
    ended it (NBD_OPT_ABORT or a refusal)."""
    sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    (client_flags,) = struct.unpack(">I", recv_exact(sock, 4))
    if client_flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        raise ProtocolError(f"unknown client flags {client_flags:#x}")
    no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
    while True:
        magic, option, length = OPTION.unpack(recv_exact(sock, OPTION.size))
        if magic != IHAVEOPT:
            raise ProtocolError("bad option magic")
        if length > MAX_OPTION:
            raise ProtocolError(f"option of {length} bytes")
        data = recv_exact(sock, length)
        if session.limit_reason is not None and option != OPT_ABORT:
            _error(sock, option, REP_ERR_POLICY, session.limit_reason)
            continue
        if option == OPT_EXPORT_NAME:
            if _known(session, data.decode("utf-8", "replace")) is None:
                raise ProtocolError("unknown export name")
            sock.sendall(
                struct.pack(">QH", size, TRANSMISSION_FLAGS) + bytes(0 if no_zeroes else 124)
            )
            return True
        if option == OPT_ABORT:
            _reply(sock, option, REP_ACK)
            return False
        if _handle_option(sock, session, option, data, size):
            return True


def _handle_option(
    sock: socket.socket, session: Session, option: int, data: bytes, size: int
) -> bool:
    """One option other than EXPORT_NAME and ABORT; True when it was a successful GO."""
    if option == OPT_LIST:
        if data:
            _error(sock, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return False
        for name in session.names:
            raw = name.encode()
            _reply(sock, option, REP_SERVER, struct.pack(">I", len(raw)) + raw)
        _reply(sock, option, REP_ACK)
    elif option in (OPT_INFO, OPT_GO):
        return _info_or_go(sock, session, option, data, size)
    elif option == OPT_STRUCTURED_REPLY:
        if data:
            _error(sock, option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            return False
        session.structured = True
        _reply(sock, option, REP_ACK)
    elif option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
        _meta_context(sock, session, option, data)
    else:
        _error(sock, option, REP_ERR_UNSUP, f"option {option} is not supported (read-only export)")
    return False


def _info_or_go(sock: socket.socket, session: Session, option: int, data: bytes, size: int) -> bool:
    try:
        name, rest = _name(data)
        (count,) = struct.unpack(">H", rest[:2])
        requests = struct.unpack(f">{count}H", rest[2 : 2 + 2 * count])
        if len(rest) != 2 + 2 * count:
            raise ValueError
    except (ValueError, struct.error):
        _error(sock, option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO")
        return False
    if _known(session, name) is None:
        _error(sock, option, REP_ERR_UNKNOWN, f"no export named {name!r}")
        return False
    _reply(sock, option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, TRANSMISSION_FLAGS))
    if INFO_BLOCK_SIZE in requests:
        block = struct.pack(">HIII", INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, MAX_PAYLOAD)
        _reply(sock, option, REP_INFO, block)
    _reply(sock, option, REP_ACK)
    return option == OPT_GO


def _meta_context(sock: socket.socket, session: Session, option: int, data: bytes) -> None:
    """LIST answers what exists; SET selects base:allocation when asked (only after
    structured replies, which block status needs)."""
    try:
        name, rest = _name(data)
        (count,) = struct.unpack(">I", rest[:4])
        queries, pos = [], 4
        for _ in range(count):
            (n,) = struct.unpack(">I", rest[pos : pos + 4])
            if n > MAX_NAME or pos + 4 + n > len(rest):
                raise ValueError
            queries.append(rest[pos + 4 : pos + 4 + n].decode("utf-8", "replace"))
            pos += 4 + n
        if pos != len(rest):
            raise ValueError
    except (ValueError, struct.error):
        _error(sock, option, REP_ERR_INVALID, "malformed meta context option")
        return
    if option == OPT_SET_META_CONTEXT and not session.structured:
        _error(sock, option, REP_ERR_INVALID, "negotiate structured replies first")
        return
    if _known(session, name) is None:
        _error(sock, option, REP_ERR_UNKNOWN, f"no export named {name!r}")
        return
    wanted = any(q in (BASE_ALLOCATION, "base:") for q in queries)
    if option == OPT_LIST_META_CONTEXT:
        wanted = wanted or not queries
    else:
        session.allocation = wanted
    if wanted:
        payload = struct.pack(">I", ALLOCATION_ID) + BASE_ALLOCATION.encode()
        _reply(sock, option, REP_META_CONTEXT, payload)
    _reply(sock, option, REP_ACK)


def _name(data: bytes) -> tuple[str, bytes]:
    (n,) = struct.unpack(">I", data[:4])
    if n > MAX_NAME or 4 + n > len(data):
        raise ValueError
    return data[4 : 4 + n].decode("utf-8", "replace"), data[4 + n :]


def _known(session: Session, name: str) -> str | None:
    """The default export ("") and the disk's own name are the same export."""
    if name == "" or name in session.names:
        session.export_name = name
        return name
    return None


def _reply(sock: socket.socket, option: int, kind: int, payload: bytes = b"") -> None:
    sock.sendall(OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, kind, len(payload)) + payload)


def _error(sock: socket.socket, option: int, kind: int, message: str) -> None:
    _reply(sock, option, kind, message.encode()[:MAX_NAME])


def structured_error(cookie: int, errno: int, message: str) -> bytes:
    text = message.encode()[:MAX_NAME]
    payload = struct.pack(">IH", errno, len(text)) + text
    return (
        STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_ERROR, cookie, len(payload))
        + payload
    )
