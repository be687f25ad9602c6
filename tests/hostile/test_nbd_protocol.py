"""A client that ignores the read-only flag or breaks the NBD protocol: writes get EPERM and
change nothing, reads past the end or too big get EINVAL, garbage ends only its own connection,
and clients beyond the limit are refused in the handshake, while others keep being served."""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.operations import nbd_protocol as p
from vmkeep.operations.nbd_server import MAX_CLIENTS

from ..e2e.conftest import Cli, sha256
from ..e2e.point_images import MiB, Point, Served, backed_up

Serving = tuple[Point, Path, Served]


@pytest.fixture
def served(cli: Cli, tmp_path: Path) -> Iterator[Serving]:
    point = backed_up(cli, tmp_path, 3 * MiB, [(0, MiB), (2 * MiB, 4096)])
    sock = tmp_path / "nbd.sock"
    with Served(cli, point, "--socket", str(sock)) as server:
        yield point, sock, server


def recv(s: socket.socket, n: int) -> bytes:
    return p.recv_exact(s, n)


def handshake(path: Path, name: str = "disk0") -> tuple[socket.socket, int]:
    """Fixed newstyle, simple replies, NBD_OPT_GO: (connected socket, export size)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(str(path))
    magic, opt_magic, _ = struct.unpack(">QQH", recv(s, 18))
    assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
    s.sendall(struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
    raw = name.encode()
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
    s.sendall(p.OPTION.pack(p.IHAVEOPT, p.OPT_GO, len(data)) + data)
    size = -1
    while True:
        _, _, kind, length = p.OPTION_REPLY.unpack(recv(s, p.OPTION_REPLY.size))
        payload = recv(s, length)
        if kind == p.REP_INFO and payload[:2] == b"\0\0":
            size = struct.unpack(">Q", payload[2:10])[0]
        elif kind == p.REP_ACK:
            return s, size
        else:
            raise ConnectionRefusedError(f"reply {kind:#x}: {payload.decode()}")


def request(s: socket.socket, kind: int, offset: int, length: int, payload: bytes = b"") -> int:
    s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, kind, 7, offset, length) + payload)
    magic, error, cookie = p.SIMPLE_REPLY.unpack(recv(s, p.SIMPLE_REPLY.size))
    assert (magic, cookie) == (p.SIMPLE_REPLY_MAGIC, 7)
    return int(error)


def test_writes_are_refused_and_change_nothing(served: Serving) -> None:
    point, sock, _ = served
    s, size = handshake(sock)
    with s:
        assert size == point.size
        assert request(s, p.CMD_WRITE, 0, 4096, b"\x55" * 4096) == p.EPERM
        assert request(s, p.CMD_WRITE_ZEROES, 0, MiB) == p.EPERM
        assert request(s, p.CMD_TRIM, 0, MiB) == p.EPERM
        assert request(s, p.CMD_READ, 0, 4096) == 0  # the connection still works
        assert recv(s, 4096) == point.raw.read_bytes()[:4096]
        assert request(s, p.CMD_READ, size - 10, 20) == p.EINVAL  # past the end
        assert request(s, p.CMD_READ, 0, p.MAX_PAYLOAD + 1) == p.EINVAL
        assert request(s, p.CMD_BLOCK_STATUS, 0, 4096) == p.EINVAL  # no context selected
        s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 8, 0, 0))
    copy = point.raw.with_name("after.raw")
    copy.touch()
    subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", str(copy)], check=True, timeout=60)
    assert sha256(copy) == point.digest


def test_garbage_and_unknown_names_end_only_that_connection(served: Serving) -> None:
    point, sock, server = served
    with pytest.raises(ConnectionRefusedError, match="no export named"):
        handshake(sock, "other")
    s, _ = handshake(sock)
    with s:
        s.sendall(b"\xde\xad" * 14)  # not a request
        assert s.recv(1) == b""  # the server hung up on this client only
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(sock))
        raw.sendall(b"\0" * 4 + struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 1 << 30))
        raw.settimeout(10)
        recv(raw, 18)
        assert raw.recv(1) == b""  # a huge option length: dropped, nothing allocated
    s, size = handshake(sock)
    with s:
        assert request(s, p.CMD_READ, 0, 512) == 0 and size == point.size
        recv(s, 512)
    assert server.proc.poll() is None


def test_clients_beyond_the_limit_are_refused_clearly(served: Serving) -> None:
    _, sock, server = served
    held = [handshake(sock)[0] for _ in range(MAX_CLIENTS)]
    try:
        with pytest.raises(ConnectionRefusedError, match="at most"):
            handshake(sock)
    finally:
        for s in held:
            s.close()
    code, err = server.stop()
    assert code == 0, err


def test_a_corrupt_chunk_is_an_io_error_never_wrong_bytes(cli: Cli, tmp_path: Path) -> None:
    """Whoever can write the remote flips a bit in a chunk: the reads of that chunk fail with
    EIO (and a warning line), the other chunks are still served, the server keeps running."""
    from vmkeep.operations.point_disk import disk_of
    from vmkeep.remotes.local import LocalRemote
    from vmkeep.repository.format import chunk_object_name
    from vmkeep.repository.repository import Repository

    point = backed_up(cli, tmp_path, 3 * MiB, [(0, 3 * MiB)])  # 1 MiB chunks: three
    repo = Repository.open(LocalRemote(point.repo), lambda: b"")
    index = disk_of(repo.load_manifest(point.point), "disk0")
    victim = point.repo / chunk_object_name(index.chunk_id(1))
    data = bytearray(victim.read_bytes())
    data[-20] ^= 1
    victim.write_bytes(bytes(data))
    sock = tmp_path / "nbd.sock"
    with Served(cli, point, "--socket", str(sock)) as server:
        s, _ = handshake(sock)
        with s:
            assert request(s, p.CMD_READ, 0, 4096) == 0
            assert recv(s, 4096) == point.raw.read_bytes()[:4096]
            assert request(s, p.CMD_READ, MiB + 10, 100) == p.EIO
            assert request(s, p.CMD_READ, 2 * MiB, 4096) == 0
            assert recv(s, 4096) == point.raw.read_bytes()[2 * MiB : 2 * MiB + 4096]
        copy = tmp_path / "copy.raw"
        uri = f"nbd+unix:///?socket={sock}"
        run = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(copy)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert run.returncode != 0  # the copy fails instead of holding wrong bytes
        assert server.proc.poll() is None
        code, err = server.stop()
    assert code == 0 and "warning: read of" in err
