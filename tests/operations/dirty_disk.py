"""A disk whose dirty ranges the test controls, read through the files connector as a
libvirt backup job's export would be (data extents, dirty extents), for the format 3
dirty-block tests (tests/operations/test_backup_dirty_blocks.py, tests/hostile/)."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmkeep.connectors.base import Extent
from vmkeep.connectors.files.connector import FilesConnector
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import Progress, SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import ZERO_ID
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 4 * MiB
BLOCK = 128 * KiB
SIZE = 8 * CHUNK + 1536 * KiB  # the last chunk is 1.5 MiB
PASSPHRASE = b"dirty blocks"


class Disk:
    """The test's disk: its bytes, which of them are data (the rest holes), and the ranges
    written since the last backup (the dirty bitmap)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.content = bytearray(size)
        self.data = bytearray(size)  # 1 per byte of data
        self.dirty: list[tuple[int, int]] = []
        self.as_written = False  # report dirty ranges in write order, not disk order

    def write(self, offset: int, piece: bytes) -> None:
        self.content[offset : offset + len(piece)] = piece
        self.data[offset : offset + len(piece)] = b"\x01" * len(piece)
        self.dirty.append((offset, len(piece)))

    def punch(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))
        self.data[offset : offset + length] = bytes(length)

    def save(self) -> None:
        self.path.write_bytes(bytes(self.content))

    def extents(self) -> list[Extent]:
        return [Extent(o, n, True) for o, n in runs_of(self.data, 0, len(self.data))]


def runs_of(mask: bytes | bytearray, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Maximal runs of non-zero bytes of mask[start:end] as (offset, length)."""
    pos = start
    while pos < end:
        lo = mask.find(1, pos, end)
        if lo < 0:
            return
        hi = mask.find(0, lo, end)
        hi = end if hi < 0 else hi
        yield lo, hi - lo
        pos = hi


class DirtyReader:
    """A raw reader that reports the test's data extents and dirty ranges, as a libvirt
    backup job's NBD export does, and records every read."""

    def __init__(self, inner: Any, disk: Disk, since: str | None, token: str | None) -> None:
        self.inner = inner
        self.disk = disk
        self.size = inner.size
        self.dirty_since = since
        self.change_token: str | None = token
        self.reads: list[tuple[int, int]] = []

    def extents(self) -> Iterator[Extent]:
        return iter(self.disk.extents())

    def dirty_extents(self) -> Iterator[Extent]:
        """In disk order, as NBD block status reports them (or as written: `as_written`)."""
        dirty = self.disk.dirty if self.disk.as_written else sorted(self.disk.dirty)
        return iter([Extent(o, n, True) for o, n in dirty])

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        data: bytes = self.inner.read(offset, length)
        return data

    def close(self) -> None:
        self.inner.close()


class DirtyConnector(FilesConnector):
    def __init__(self, disk: Disk) -> None:
        super().__init__()
        self.disk = disk
        self.generation = 0
        self.reader: DirtyReader | None = None

    def begin_backup(self, vm: Any, previous: dict[str, str | None]) -> Any:
        session = super().begin_backup(vm, previous)
        self.generation += 1
        inner = session.readers["disk0"]
        since = previous.get("disk0")
        self.reader = DirtyReader(inner, self.disk, since, f"gen{self.generation}")
        session.readers["disk0"] = self.reader  # a DiskReader by its protocol
        return session


class Recorded:
    """A progress sink that keeps what it was told."""

    def __init__(self) -> None:
        self.total = self.advanced = 0
        self.notes: list[str] = []

    def start(self, description: str, total: int) -> None:
        self.total += total

    def advance(self, amount: int) -> None:
        self.advanced += amount

    def finish(self) -> None:
        pass

    def note(self, message: str) -> None:
        self.notes.append(message)


def make_vm(parent: Path, size: int = SIZE) -> tuple[Path, Disk]:
    vm = parent / "vm"
    vm.mkdir(parents=True)
    disk = Disk(vm / "disk0.img", size)
    doc = {
        "name": "vm",
        "uuid": str(uuid.uuid4()),
        "vcpus": 1,
        "memory_mib": 64,
        "disks": [{"name": "disk0", "file": "disk0.img", "format": "raw"}],
    }
    (vm / "vm.json").write_text(json.dumps(doc))
    return vm, disk


def new_repo(path: Path, encryption: str = "none") -> Repository:
    return Repository.init(
        LocalRemote(str(path)), encryption, lambda: PASSPHRASE, format_version=3, block_size=BLOCK
    )


def prefill(disk: Disk, rng: random.Random) -> None:
    """Chunks 0-3 all data, 4 sparse (two pieces), 5 empty, 6 one block only, 7 data in its
    first half, 8 (the short last chunk) all data."""
    disk.write(0, rng.randbytes(4 * CHUNK))
    disk.write(4 * CHUNK + 300 * KiB, rng.randbytes(200 * KiB))
    disk.write(4 * CHUNK + 3 * MiB, rng.randbytes(64 * KiB))
    disk.write(6 * CHUNK + 5 * BLOCK, rng.randbytes(BLOCK))
    disk.write(7 * CHUNK, rng.randbytes(2 * MiB))
    disk.write(8 * CHUNK, rng.randbytes(1536 * KiB))


def change(disk: Disk, rng: random.Random) -> None:
    """Scattered 64 KiB writes (one straddling two blocks, one two chunks), a chunk mostly
    rewritten, a write into a chunk that was empty, a hole punched, the only block of chunk 6
    zeroed, and the short last chunk."""
    disk.dirty = []
    for offset in (64 * KiB, 1 * MiB + 100 * KiB, 3 * MiB):  # chunk 0
        disk.write(offset, rng.randbytes(64 * KiB))
    disk.write(2 * CHUNK - 32 * KiB, rng.randbytes(64 * KiB))  # chunks 1 and 2
    disk.write(3 * CHUNK + MiB // 2, rng.randbytes(7 * MiB // 2))  # chunk 3: 7/8, read whole
    disk.write(4 * CHUNK + 2 * MiB, rng.randbytes(64 * KiB))  # chunk 4: a new piece
    disk.write(5 * CHUNK + 7 * BLOCK, rng.randbytes(4 * KiB))  # chunk 5 was empty
    disk.write(6 * CHUNK + 5 * BLOCK, bytes(BLOCK))  # chunk 6 becomes all zeros
    disk.punch(7 * CHUNK + BLOCK, 2 * BLOCK)  # chunk 7: two blocks are holes now
    disk.write(8 * CHUNK + 1400 * KiB, rng.randbytes(136 * KiB))  # up to the disk's end


def expected_reads(disk: Disk, size: int) -> list[tuple[int, int]]:
    """The byte ranges a dirty-block read reads, computed from byte maps: per dirty chunk,
    its data inside the blocks the dirty ranges touch, or all its data when those blocks
    are more than 3/4 of the chunk."""
    touched: dict[int, set[int]] = {}
    for offset, length in disk.dirty:
        for b in range(offset // BLOCK, -(-(offset + length) // BLOCK)):
            touched.setdefault(b * BLOCK // CHUNK, set()).add(b)
    reads = []
    for chunk, blocks in sorted(touched.items()):
        start, end = chunk * CHUNK, min((chunk + 1) * CHUNK, size)
        mask = bytearray(end - start)
        cover = sum(min((b + 1) * BLOCK, end) - b * BLOCK for b in blocks)
        if cover > (end - start) * 3 / 4:
            mask[:] = disk.data[start:end]
        else:
            for b in blocks:
                lo, hi = b * BLOCK - start, min((b + 1) * BLOCK, end) - start
                mask[lo:hi] = disk.data[start + lo : start + hi]
        if any(mask):
            reads += [(start + o, n) for o, n in runs_of(mask, 0, len(mask))]
    return reads


def whole_ids(repo: Repository, content: bytes) -> list[bytes]:
    ids = []
    for start in range(0, len(content), CHUNK):
        piece = content[start : start + CHUNK]
        ids.append(ZERO_ID if not any(piece) else repo.chunk_id(piece))
    return ids


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def restored(repo: Repository, point: str, out: Path) -> bytes:
    out.mkdir()
    report = restore_vm(repo, FilesConnector(), point, str(out), SilentProgress(), name="copy")
    return (Path(report.location) / "disk0.img").read_bytes()


def run_delta(
    tmp: Path,
    encryption: str = "none",
    between: Any = None,
    progress: Progress | None = None,
) -> tuple[Repository, Disk, Any, DirtyReader]:
    """prefill, full backup, `between(repo_dir)`, change, delta backup."""
    rng = random.Random(15)
    vm, disk = make_vm(tmp / "vms")
    prefill(disk, rng)
    disk.save()
    repo = new_repo(tmp / "repo", encryption)
    connector = DirtyConnector(disk)
    backup_vm(repo, connector, str(vm), BackupOptions(mode="full"), SilentProgress())
    if between is not None:
        between(tmp / "repo")
    repo = Repository.open(LocalRemote(str(tmp / "repo")), lambda: PASSPHRASE)  # a new run
    change(disk, rng)
    disk.save()
    report = backup_vm(
        repo, connector, str(vm), BackupOptions(mode="delta"), progress or SilentProgress()
    )
    assert connector.reader is not None
    return repo, disk, report, connector.reader
