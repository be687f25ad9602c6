"""`vmkeep serve-nbd`: qemu-img and nbdcopy read the disk hash-equal to the raw restore, the
holes of the index show in `nbdinfo --map` (so copies skip them), the server stops cleanly on
SIGTERM and SIGINT (socket removed), and bad input is one error line (docs/MOUNT-EXPORT.md §2)."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest

from .conftest import Cli, sha256
from .point_images import ODD_DATA, ODD_SIZE, KiB, MiB, Point, Served, backed_up

CHUNK = MiB  # backed_up's chunk size: holes are whole chunks without data


@pytest.fixture
def point(cli: Cli, tmp_path: Path) -> Point:
    return backed_up(cli, tmp_path, ODD_SIZE, ODD_DATA)


def expected_map(p: Point) -> list[tuple[int, int, bool]]:
    """(offset, length, data) merged over whole chunks, as the index knows them."""
    chunks = {o // CHUNK for off, n in p.data for o in range(off, off + n, 4 * KiB)}
    chunks |= {(off + n - 1) // CHUNK for off, n in p.data}
    out: list[tuple[int, int, bool]] = []
    for i in range(-(-p.size // CHUNK)):
        start, end, data = i * CHUNK, min((i + 1) * CHUNK, p.size), i in chunks
        if out and out[-1][2] == data:
            out[-1] = (out[-1][0], end - out[-1][0], data)
        else:
            out.append((start, end - start, data))
    return out


def nbd_map(uri: str) -> list[tuple[int, int, bool]]:
    out = subprocess.run(
        ["nbdinfo", "--map", uri], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return [(int(r[0]), int(r[1]), int(r[2]) & 1 == 0) for r in rows]


def qemu_img_copy(uri: str, copy: Path) -> Path:
    """The export read whole by qemu-img (a client that is not vmkeep's) into `copy`."""
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(copy)], check=True, timeout=120
    )
    return copy


def test_qemu_img_and_nbdcopy_read_the_disk_and_skip_holes(
    cli: Cli, point: Point, tmp_path: Path
) -> None:
    sock = tmp_path / "nbd.sock"
    with Served(cli, point, "--socket", str(sock)) as served:
        assert served.uri == f"nbd+unix:///disk0?socket={sock}"
        assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o600
        assert nbd_map(served.uri) == expected_map(point)
        copy = qemu_img_copy(served.uri, tmp_path / "qemu.raw")
        assert sha256(copy) == point.digest
        # holes were skipped, not written as zeros: the copy is as sparse as the index
        assert copy.stat().st_blocks * 512 <= 2 * CHUNK * sum(d for *_, d in expected_map(point))
        nbdcopy = tmp_path / "nbdcopy.raw"
        nbdcopy.touch()
        subprocess.run(["nbdcopy", served.uri, str(nbdcopy)], check=True, timeout=120)
        assert sha256(nbdcopy) == point.digest
        code, err = served.stop(signal.SIGTERM)
    assert code == 0, err
    assert "Traceback" not in err and "error" not in err
    assert not sock.exists()


def test_tcp_port_zero_and_sigint(cli: Cli, point: Point, tmp_path: Path) -> None:
    with Served(cli, point, "--port", "0") as served:
        assert served.uri.startswith("nbd://127.0.0.1:") and served.uri.endswith("/disk0")
        copy = qemu_img_copy(served.uri, tmp_path / "tcp.raw")
        assert sha256(copy) == point.digest
        code, err = served.stop(signal.SIGINT)
    assert code == 0, err


def test_a_write_through_qemu_io_fails(cli: Cli, point: Point, tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    with Served(cli, point, "--socket", str(sock)) as served:
        run = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64k", served.uri],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode != 0 or "fail" in (run.stdout + run.stderr).lower()
        copy = tmp_path / "after.raw"
        subprocess.run(["nbdcopy", served.uri, str(copy)], check=True, timeout=60)
        assert sha256(copy) == point.digest


def test_bad_point_disk_and_port_in_use_are_one_line(
    cli: Cli, point: Point, tmp_path: Path
) -> None:
    repo = str(point.repo)
    run = cli("serve-nbd", "nosuchpoint", "disk0", "--remote", repo, "--port", "0", ok=False)
    assert run.code not in (0, 70)
    run = cli("serve-nbd", point.point, "disk9", "--remote", repo, "--port", "0", ok=False)
    assert "no disk 'disk9'" in run.err and run.code not in (0, 70)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        run = cli("serve-nbd", point.point, "disk0", "--remote", repo, "--port", port, ok=False)
    assert "cannot listen on 127.0.0.1:" in run.err and run.code not in (0, 70)
    plain = tmp_path / "not-a-socket"
    plain.write_text("keep me")
    run = cli("serve-nbd", point.point, "disk0", "--remote", repo, "--socket", str(plain), ok=False)
    assert plain.read_text() == "keep me" and run.code not in (0, 70)
    run = cli(
        "serve-nbd", point.point, "disk0", "--remote", repo, "--socket", "x", "--port", "1",
        ok=False,
    )  # fmt: skip
    assert "not both" in run.err


def test_a_stale_socket_is_replaced(cli: Cli, point: Point, tmp_path: Path) -> None:
    sock = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sock))
    dead.close()  # bound, never listening: what a killed server leaves
    with Served(cli, point, "--socket", str(sock)) as served:
        assert nbd_map(served.uri) == expected_map(point)
        assert served.stop()[0] == 0
    assert not sock.exists()
