"""A full backup reads only the data extents inside each chunk (operations/chunk_extents.py):
bytes_read equals the allocated bytes, chunk IDs are those of whole chunks, restores match."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmkeep.connectors.base import Extent
from vmkeep.connectors.files.connector import FilesConnector
from vmkeep.connectors.files.qcow2 import Qcow2Reader
from vmkeep.connectors.files.raw import RawDiskReader
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.chunk_extents import read_spans, spans_by_chunk
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import ZERO_ID
from vmkeep.repository.repository import Repository

MiB = 1 << 20
KiB = 1 << 10
CHUNK = 4 * MiB
SIZE = 64 * MiB
PIECE = 64 * KiB


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scattered_writes(seed: int) -> list[int]:
    """Offsets of 64 KiB pieces: 2-4 per chunk in 9 of the 16 chunks, plus one that
    straddles the boundary between chunks 12 and 13; never two in the same 64 KiB slot."""
    rng = random.Random(seed)
    offsets = {12 * CHUNK + CHUNK - PIECE // 2}
    for chunk in rng.sample(range(11), 9):
        slots = rng.sample(range(1, CHUNK // PIECE - 1), rng.randint(2, 4))
        offsets |= {chunk * CHUNK + slot * PIECE for slot in slots}
    return sorted(offsets)


def make_vm(parent: Path, name: str, offsets: list[int], size: int = SIZE) -> Path:
    vm = parent / name
    vm.mkdir(parents=True)
    with open(vm / "disk0.img", "wb") as f:
        f.truncate(size)
        for offset in offsets:
            f.seek(offset)
            f.write(os.urandom(PIECE))
    write_vm_json(vm, "disk0.img", "raw")
    return vm


def write_vm_json(vm: Path, file: str, fmt: str) -> None:
    doc = {
        "name": vm.name,
        "uuid": str(uuid.uuid4()),
        "vcpus": 1,
        "memory_mib": 64,
        "disks": [{"name": "disk0", "file": file, "format": fmt}],
    }
    (vm / "vm.json").write_text(json.dumps(doc))


def data_bytes(reader: Any) -> int:
    return sum(e.length for e in reader.extents() if e.data)


def new_repo(path: Path) -> Repository:
    return Repository.init(LocalRemote(str(path)), "none", lambda: b"")


def restored_disk(repo: Repository, point: str, out: Path) -> Path:
    out.mkdir()
    report = restore_vm(repo, FilesConnector(), point, str(out), SilentProgress(), name="copy")
    doc = json.loads((Path(report.location) / "vm.json").read_text())
    return Path(report.location) / doc["disks"][0]["file"]


def as_raw(path: Path, fmt: str, out: Path) -> Path:
    if fmt == "raw":
        return path
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(out)], check=True)
    return out


def check_whole_chunk_ids(repo: Repository, point: str, raw: Path) -> None:
    """Every chunk ID is the ID of the whole chunk as a full read returns it (dedup with
    points made before this change, and with other VMs, depends on it)."""
    manifest = repo.load_manifest(repo.resolve_point(point))
    (disk,) = manifest.disks
    content = raw.read_bytes()
    for index in range(len(content) // CHUNK):
        whole = content[index * CHUNK : (index + 1) * CHUNK]
        want = ZERO_ID if whole == bytes(CHUNK) else repo.chunk_id(whole)
        assert disk.chunk_id(index) == want, index


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_full_backup_reads_only_allocated_bytes(tmp_path: Path, fmt: str) -> None:
    offsets = scattered_writes(7)
    vm = make_vm(tmp_path / "vms", "sparse", offsets)
    source = vm / "disk0.img"
    if fmt == "qcow2":
        if shutil.which("qemu-img") is None:
            pytest.skip("qemu-img is not installed (apt-get install qemu-utils)")
        subprocess.run(
            ["qemu-img", "convert", "-O", "qcow2", str(source), str(vm / "disk0.qcow2")],
            check=True,
        )
        source.unlink()
        source = vm / "disk0.qcow2"
        write_vm_json(vm, "disk0.qcow2", "qcow2")
        reader: Any = Qcow2Reader(source)
    else:
        reader = RawDiskReader(source)
    allocated = data_bytes(reader)
    reader.close()
    if fmt == "raw" and allocated != len(offsets) * PIECE:
        pytest.skip("this file system does not report holes exactly (SEEK_DATA)")
    # qcow2's 64 KiB clusters: the piece straddling two chunks is not cluster-aligned.
    assert allocated == (len(offsets) + (fmt == "qcow2")) * PIECE
    repo = new_repo(tmp_path / "repo")
    report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    s = report.stats
    touched = len({o // CHUNK for o in offsets} | {(o + PIECE - 1) // CHUNK for o in offsets})
    assert s.chunks == touched == 11
    assert s.bytes_read == allocated  # not touched x 4 MiB (44 MiB)
    assert s.bytes_new == s.bytes_chunks == touched * CHUNK and s.bytes_zero == 0
    original = as_raw(source, fmt, tmp_path / "source.raw")
    check_whole_chunk_ids(repo, report.restore_point, original)
    copy = restored_disk(repo, report.restore_point, tmp_path / "restored")
    assert sha256(as_raw(copy, fmt, tmp_path / "copy.raw")) == sha256(original)


class ChangingReader:
    """A reader whose disk is changed by `change(path)` right after the backup's first
    extent walk (the one that decides which chunks are read), before any chunk is read."""

    def __init__(self, inner: RawDiskReader, change: Callable[[Path], None]) -> None:
        self.inner = inner
        self.change = change
        self.walks = 0
        self.size = inner.size
        self.change_token = inner.change_token
        self.dirty_since = inner.dirty_since

    def extents(self) -> Iterator[Extent]:
        yield from self.inner.extents()
        self.walks += 1
        if self.walks == 1:
            self.change(self.inner.path)

    def dirty_extents(self) -> Iterator[Extent]:
        return self.inner.dirty_extents()

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def close(self) -> None:
        self.inner.close()


class ChangingConnector(FilesConnector):
    def __init__(self, change: Callable[[Path], None]) -> None:
        super().__init__()
        self.change = change
        self.readers: list[ChangingReader] = []

    def begin_backup(self, vm: Any, previous: dict[str, str | None]) -> Any:
        session = super().begin_backup(vm, previous)
        for name, reader in session.readers.items():
            changing = ChangingReader(reader, self.change)
            self.readers.append(changing)
            session.readers[name] = changing
        return session


def write_at(writes: dict[int, bytes]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        with open(path, "r+b") as f:
            for offset, data in writes.items():
                f.seek(offset)
                f.write(data)

    return change


def test_data_written_into_a_hole_after_the_walk_is_not_zero_filled(tmp_path: Path) -> None:
    """The holes of a chunk are looked up when it is read, not taken from the first walk: a
    chunk the first walk found data in is stored as a whole read would store it."""
    vm = make_vm(tmp_path / "vms", "busy", [CHUNK + MiB, 5 * CHUNK], size=8 * CHUNK)
    source = vm / "disk0.img"
    late = {CHUNK + 3 * MiB: os.urandom(PIECE), 3 * CHUNK: os.urandom(PIECE)}
    connector = ChangingConnector(write_at(late))
    repo = new_repo(tmp_path / "repo")
    report = backup_vm(repo, connector, str(vm), BackupOptions(), SilentProgress())
    assert [r.walks for r in connector.readers] == [2]
    # Chunk 1's late piece is read (a whole-chunk read would have read it too); chunk 3 had
    # no data at the first walk and is not read, as before: the files connector backs up VMs
    # that are not running, so no write lands between the walks (docs/DATA-PATH.md).
    assert report.stats.bytes_read == 3 * PIECE
    expected = bytearray(source.read_bytes())
    expected[3 * CHUNK : 3 * CHUNK + PIECE] = bytes(PIECE)
    copy = restored_disk(repo, report.restore_point, tmp_path / "restored")
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(expected).digest()


def test_a_chunk_emptied_after_the_walk_is_a_zero_chunk(tmp_path: Path) -> None:
    vm = make_vm(tmp_path / "vms", "trimmed", [0, 2 * CHUNK], size=4 * CHUNK)

    def punch(path: Path) -> None:  # chunk 2's data is gone by the time it is read
        os.truncate(path, 2 * CHUNK)
        os.truncate(path, 4 * CHUNK)

    repo = new_repo(tmp_path / "repo")
    report = backup_vm(repo, ChangingConnector(punch), str(vm), BackupOptions(), SilentProgress())
    assert report.stats.chunks == 2 and report.stats.bytes_read == PIECE
    (disk,) = repo.load_manifest(report.restore_point).disks
    assert disk.chunk_id(0) != ZERO_ID and disk.chunk_id(2) == ZERO_ID


def expand(extents: list[Extent], size: int) -> bytearray:
    """1 per byte of data, 0 per byte of hole."""
    out = bytearray(size)
    for e in extents:
        if e.data:
            out[e.offset : e.offset + e.length] = b"\x01" * e.length
    return out


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 200), min_size=1, max_size=30),
    data_first=st.booleans(),
    chunk=st.sampled_from([8, 16, 64]),
    wanted_mask=st.integers(0, 2**40),
)
def test_spans_match_a_byte_map(
    cuts: list[int], data_first: bool, chunk: int, wanted_mask: int
) -> None:
    extents, pos, data = [], 0, data_first
    for n in cuts:
        extents.append(Extent(pos, n, data))
        pos, data = pos + n, not data
    size = pos
    count = -(-size // chunk)
    wanted = [i for i in range(count) if wanted_mask >> (i % 40) & 1]
    truth = expand(extents, size)
    for index, spans in spans_by_chunk(extents, wanted, size, chunk):
        start = index * chunk
        got = bytearray(min(chunk, size - start))
        for offset, n in spans:
            assert n > 0
            got[offset : offset + n] = b"\x01" * n
        assert got == truth[start : start + len(got)], (index, spans)
        ends = [o + n for o, n in spans]
        assert all(e < o for e, (o, _) in zip(ends, spans[1:], strict=False))  # joined
    assert [i for i, _ in spans_by_chunk(extents, wanted, size, chunk)] == wanted


class FakeReader:
    def __init__(self, content: bytes) -> None:
        self.content = content
        self.size = len(content)
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.content[offset : offset + length]


def test_read_spans_zero_fills_between_reads() -> None:
    reader = FakeReader(bytes(range(256)) * 64)  # 16 KiB, no zeros to hide a bug
    data = read_spans(reader, 4096, 4096, [(100, 50), (1000, 24)], "d")  # type: ignore[arg-type]
    assert reader.reads == [(4196, 50), (5096, 24)]
    want = bytearray(4096)
    want[100:150] = reader.content[4196:4246]
    want[1000:1024] = reader.content[5096:5120]
    assert data == bytes(want)
    assert read_spans(reader, 0, 4096, [(0, 4096)], "d") == reader.content[:4096]  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 200), min_size=1, max_size=30),
    data_first=st.booleans(),
    chunk=st.sampled_from([16, 64, 256]),
    gap=st.integers(0, 120),
)
def test_spans_merged_across_small_holes_only(
    cuts: list[int], data_first: bool, chunk: int, gap: int
) -> None:
    """With a gap, spans still cover every data byte; a hole byte is read only inside a hole
    shorter than the gap between two data bytes of the same chunk; spans stay >= gap apart."""
    extents, pos, data = [], 0, data_first
    for n in cuts:
        extents.append(Extent(pos, n, data))
        pos, data = pos + n, not data
    size = pos
    truth = expand(extents, size)
    count = -(-size // chunk)
    for index, spans in spans_by_chunk(extents, range(count), size, chunk, gap):
        start = index * chunk
        piece = truth[start : start + chunk]
        for o, n in spans:
            assert piece[o] == 1 and piece[o + n - 1] == 1, (index, spans)  # data at both ends
            holes = bytes(piece[o : o + n]).split(b"\x01")
            assert all(len(h) < max(gap, 1) for h in holes), (index, spans, gap)
        covered = bytearray(len(piece))
        for o, n in spans:
            covered[o : o + n] = b"\x01" * n
        assert all(c for c, t in zip(covered, piece, strict=True) if t), (index, spans)
        pairs = itertools.pairwise(spans)
        assert all(o2 - (o1 + n1) >= max(gap, 1) for (o1, n1), (o2, _) in pairs)


def test_many_small_extents_of_a_chunk_are_one_read_through_small_holes() -> None:
    """32 pieces of 16 KiB, 112 KiB apart, in one 4 MiB chunk: one NBD-like request with a
    128 KiB gap (holes included in what is read), 32 without; the bytes are the same."""
    extents, pos = [], 0
    for _ in range(32):
        extents += [Extent(pos, 16 * KiB, True), Extent(pos + 16 * KiB, 112 * KiB, False)]
        pos += 128 * KiB
    content = bytearray(random.Random(7).randbytes(CHUNK))
    for e in extents:
        if not e.data:
            content[e.offset : e.offset + e.length] = bytes(e.length)
    merged = list(spans_by_chunk(extents, [0], CHUNK, CHUNK, 128 * KiB))
    apart = list(spans_by_chunk(extents, [0], CHUNK, CHUNK, 0))
    assert merged == [(0, [(0, 31 * 128 * KiB + 16 * KiB)])]
    assert len(apart[0][1]) == 32
    for spans, reads in ((merged[0][1], 1), (apart[0][1], 32)):
        reader = FakeReader(bytes(content))
        assert read_spans(reader, 0, CHUNK, spans, "d") == bytes(content)  # type: ignore[arg-type]
        assert len(reader.reads) == reads
    assert list(spans_by_chunk(extents, [0], CHUNK, CHUNK, 112 * KiB)) == apart  # not below
