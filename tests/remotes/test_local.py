"""The local remote: the shared contract (remote_contract.py), plus what only a directory
meets: temp files of dead writers, read-only and full file systems."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from vmkeep.errors import ObjectExistsError, RemoteError, RemoteFullError
from vmkeep.remotes.base import put_parts
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.crypto import Sealed
from vmkeep.repository.repository import Repository

from .remote_contract import RemoteContract, Reopen, Stored

MiB = 1 << 20


@pytest.fixture
def remote(tmp_path: Path) -> LocalRemote:
    return LocalRemote(tmp_path / "repo")


@pytest.fixture
def reopen(remote: LocalRemote) -> Reopen:
    return lambda: LocalRemote(remote.root)


@pytest.fixture
def stored(remote: LocalRemote) -> Stored:
    def read() -> dict[str, bytes]:
        return {
            p.relative_to(remote.root).as_posix(): p.read_bytes()
            for p in remote.root.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        }

    return read


class TestContract(RemoteContract):
    free_space_known = True


def test_temp_files_are_invisible_and_purged(tmp_path: Path) -> None:
    r = LocalRemote(tmp_path)
    r.put("chunks/ab/abcd", b"x")
    (tmp_path / "chunks" / "ab" / ".tmp-1-dead").write_bytes(b"partial")
    assert [o.name for o in r.list("chunks/")] == ["chunks/ab/abcd"]
    assert r.purge_incomplete(older_than=0) == 1
    assert not (tmp_path / "chunks" / "ab" / ".tmp-1-dead").exists()


@pytest.mark.parametrize("name", [".tmp-x", "a/.tmp-1-2"])
def test_temp_names_refused(tmp_path: Path, name: str) -> None:
    """Names of the temp files of writers (the contract checks the escaping ones)."""
    with pytest.raises(RemoteError, match="invalid object name"):
        LocalRemote(tmp_path / "root").put(name, b"x")


def test_read_only_directory() -> None:
    """As root the check runs in a child as `nobody`: root itself ignores file permissions."""
    import shutil
    import sys
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="vmkeep-ro-"))
    try:
        base.chmod(0o755)
        (base / "ro").mkdir(mode=0o555)
        (base / "ro").chmod(0o555)
        code = (
            "import sys\n"
            "from vmkeep.errors import RemoteError\n"
            "from vmkeep.remotes.local import LocalRemote\n"
            "try:\n"
            f"    LocalRemote({str(base / 'ro')!r}).put('x', b'1')\n"
            "except RemoteError as exc:\n"
            "    print(exc)\n"
            "    sys.exit(0)\n"
            "sys.exit(3)\n"
        )
        user = 65534 if os.geteuid() == 0 else None
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, user=user, cwd=base
        )
        assert res.returncode == 0, res.stderr
        assert "permission denied" in res.stdout
        assert os.listdir(base / "ro") == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _mount_tmpfs(path: Path, size: str, ro: bool = False) -> None:
    path.mkdir()
    opts = f"size={size}" + (",ro" if ro else "")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}): needs root")


def test_full_and_read_only_remotes(tmp_path: Path) -> None:
    full = tmp_path / "full"
    _mount_tmpfs(full, "1m")
    try:
        r = LocalRemote(full)
        with pytest.raises(RemoteFullError, match="no space"):
            r.put("big", os.urandom(2 * 1024 * 1024))
        assert list(r.list("")) == []  # no partial object left behind, no temp file either
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)], check=False)
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "1m", ro=True)
    try:
        with pytest.raises(RemoteError, match="read-only"):
            LocalRemote(ro).put("x", b"1")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_remote_test_leaves_the_location_empty(tmp_path: Path) -> None:
    """`vmkeep remote test PATH` then `vmkeep remote add NAME PATH`: the probe must not leave
    a directory behind, or the location no longer counts as empty and `remote add` refuses it."""
    from vmkeep.operations.remote_probe import probe_remote

    location = tmp_path / "new"
    location.mkdir()
    assert probe_remote(LocalRemote(location), size=1 << 20).ok
    assert list(location.iterdir()) == []


def test_put_parts_stores_the_parts_in_order(tmp_path: Path) -> None:
    """More parts than one writev takes (IOV_MAX), empty ones among them: the object is
    exactly their concatenation, and a create-if-absent put_parts refuses an existing one."""
    rng = random.Random(3)
    parts = [rng.randbytes(rng.choice((0, 1, 100, 4096, 70_000))) for _ in range(2500)]
    r = LocalRemote(tmp_path)
    r.put_parts("packs/ab/abcd", parts)
    got = (tmp_path / "packs" / "ab" / "abcd").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(b"".join(parts)).digest()
    r.put_parts("one", [b"single"])
    assert r.get("one") == b"single"
    with pytest.raises(ObjectExistsError):
        r.put_parts("one", [b"x", b"y"], overwrite=False)
    assert r.get("one") == b"single"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["abcd", "one"]


class CountingPuts(LocalRemote):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.seen: list[tuple[str, int]] = []

    def put(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        self.seen.append((name, len(data)))
        super().put(name, data, overwrite=overwrite)


def test_put_parts_goes_through_an_overriding_put(tmp_path: Path) -> None:
    """A subclass that wraps `put` (tests inject faults that way) sees the joined object."""
    r = CountingPuts(tmp_path)
    pieces = [b"ab", b"", b"cde"]
    put_parts(r, "packs/cd/cdef", pieces)
    assert r.seen == [("packs/cd/cdef", 5)]
    assert r.get("packs/cd/cdef") == b"abcde"
    assert pieces == []  # handed over: the caller holds no second copy while it is sent


def test_a_sealed_object_is_written_once(tmp_path: Path) -> None:
    """store_chunk takes the pieces of the encoded chunk: a second write of the same object
    fails loudly instead of writing an empty object under the chunk's name."""
    repo = Repository.init(
        LocalRemote(tmp_path / "r"), "aes-256-gcm", lambda: b"pw", format_version=1
    )
    data = os.urandom(MiB)
    chunk_id = repo.chunk_id(data)
    blob = repo.encode_chunk(chunk_id, data, 1)
    assert isinstance(blob, Sealed)
    size = len(blob)
    repo.store_chunk(chunk_id, blob)
    assert len(blob) == size
    with pytest.raises(RuntimeError, match="already handed over"):
        repo.store_chunk(chunk_id, blob)
    assert repo.get_chunk(chunk_id) == data
    stored = tmp_path / "r" / "chunks" / chunk_id.hex()[:2] / chunk_id.hex()
    assert stored.stat().st_size == size


def test_put_parts_on_a_full_file_system_leaves_nothing(tmp_path: Path) -> None:
    full = tmp_path / "full"
    _mount_tmpfs(full, "1m")
    try:
        with pytest.raises(RemoteFullError, match="no space"):
            LocalRemote(full).put_parts("big", [os.urandom(100_000) for _ in range(20)])
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)], check=False)
