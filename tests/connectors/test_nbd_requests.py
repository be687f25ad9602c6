"""The live backup's NBD reader sends a chunk as requests of at most 1 MiB (nbd_reader.REQUEST:
QEMU's NBD server reuses its buffers for those, and page-faults fresh ones for 4 MiB requests
in flight at once), and puts the replies together in order. A real NBD server (nbdkit, file
plugin) serves a file; its log filter records the requests it got."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.connectors.libvirt.transport.nbd_reader import REQUEST, NbdDiskReader

MiB = 1 << 20


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(image, socket, request log) of an nbdkit serving a random 9 MiB file."""
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    try:
        from vmkeep.connectors.libvirt.bindings import nbd

        nbd()
    except Exception as exc:  # the libnbd bindings come from Debian
        pytest.skip(f"libnbd bindings unavailable: {exc}")
    image, sock, log = tmp_path / "disk.img", tmp_path / "nbd.sock", tmp_path / "requests.log"
    image.write_bytes(os.urandom(9 * MiB))
    argv = ["nbdkit", "-f", "-U", str(sock), "--filter=log", "file", f"file={image}"]
    proc = subprocess.Popen([*argv, f"logfile={log}"])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        yield image, sock, log
    finally:
        proc.terminate()
        proc.wait(10)


def read_requests(log: Path) -> list[tuple[int, int]]:
    """(offset, count) of every Read the server logged."""
    text = log.read_text()
    return [
        (int(off, 16), int(count, 16))
        for off, count in re.findall(r"Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)", text)
    ]


def test_a_chunk_is_read_in_requests_of_at_most_one_mib(served: tuple[Path, Path, Path]) -> None:
    image, sock, log = served
    assert MiB == REQUEST
    reader = NbdDiskReader(str(sock), "", name="vda", change_token=None, max_connections=1)
    try:
        got = reader.read(4096, 4 * MiB + 1000)  # a chunk not aligned to the request size
        small = reader.read(8 * MiB, 4096)
    finally:
        reader.close()
    want = image.read_bytes()
    assert (
        hashlib.sha256(got).digest() == hashlib.sha256(want[4096 : 4096 + 4 * MiB + 1000]).digest()
    )
    assert small == want[8 * MiB : 8 * MiB + 4096]
    requests = read_requests(log)
    assert requests[:5] == [(4096 + k * MiB, MiB) for k in range(4)] + [(4096 + 4 * MiB, 1000)]
    assert requests[5:] == [(8 * MiB, 4096)]
