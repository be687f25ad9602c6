"""gc's live set as an external sort (issue 15, "gc memory"): live blob keys (blob ID then
kind, the order of the on-disk index's records, index_file.py) are buffered up to a fixed
count, sorted and spilled to run files in a private directory under the repository's cache
directory; `sorted_unique` merges the runs (k-way, as in any external sort) and drops
duplicates. Memory follows the buffer, not the repository: a 1 TiB format 3 repository has
~16 M live blocks, held as a Python set they took gigabytes. The directory is removed on
`close`, also when the caller fails (use as a context manager); a killed gc's directory
(named after its pid and start time) is removed by the next one. More than FAN_IN runs are
merged in passes, so that the merge's read buffers stay bounded too. The same sort, with
`key_size` set, orders gc's live index entries by pack (pack_repack.py), and with `unique`
(a set as buffer: keys repeated within a buffer, such as the chunks restore points share,
are spilled once) the referenced chunk IDs (pack_gc.referenced_sort)."""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from types import TracebackType

from vmkeep.private_tmp import private_dir, remove_dead
from vmkeep.processes import start_time

from .cache_dir import cache_root, repository_cache
from .format import ID_SIZE

KEY_SIZE = ID_SIZE + 1  # blob ID, kind byte: sorts like the index file's records
BUFFER_KEYS = 1 << 20  # keys held before a spill: 33 B each in a list, ~60 MiB with overhead
_READ = 1 << 16  # bytes read at a time from each run while merging
FAN_IN = 64  # runs merged at once (a read buffer each: 4 MiB); more are merged in passes
PREFIX = "gc-live-"


def live_key(kind: int, blob_id: bytes) -> bytes:
    return blob_id + bytes((kind,))


class LiveKeys:
    """Collects keys, then yields them once each in sorted order."""

    def __init__(
        self,
        parent: Path,
        buffer_keys: int = BUFFER_KEYS,
        key_size: int = KEY_SIZE,
        unique: bool = False,
    ) -> None:
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_dead(parent, PREFIX)  # the run directories of killed gc processes
        me = os.getpid()
        prefix = f"{PREFIX}{me}-{start_time(me) or 0}-"
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))  # mode 0700
        self.buffer_keys = buffer_keys
        self.key_size = key_size
        self._buffer: list[bytes] = []
        self._unique: set[bytes] | None = set() if unique else None
        self.runs: list[Path] = []  # every run spilled
        self._active: list[Path] = []  # the runs left to merge (fewer after a pass)
        self._passes = 0

    def add(self, key: bytes) -> None:
        if len(key) != self.key_size:
            raise ValueError("sort key of the wrong size")
        held = self._unique
        if held is None:
            self._buffer.append(key)
            if len(self._buffer) >= self.buffer_keys:
                self._spill()
        else:
            held.add(key)
            if len(held) >= self.buffer_keys:
                self._spill()

    def add_many(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            self.add(key)

    def _spill(self) -> None:
        if self._unique is not None:
            self._buffer, self._unique = list(self._unique), set()
        path = self.dir / f"run-{len(self.runs):06d}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._buffer.sort()  # in place: no second copy (duplicates go at the merge)
        with os.fdopen(fd, "wb") as f:
            for at in range(0, len(self._buffer), 4096):
                f.write(b"".join(self._buffer[at : at + 4096]))
        self.runs.append(path)
        self._active.append(path)
        self._buffer = []

    def flush(self) -> None:
        """Spills what the buffer holds (its memory back before other work); a key added
        later starts a new run."""
        if self._buffer or self._unique:
            self._spill()

    def sorted_unique(self) -> Iterator[bytes]:
        """Every key added, once, in ascending order (the buffer is spilled first)."""
        if self._buffer or self._unique or not self.runs:
            self._spill()
        while len(self._active) > FAN_IN:
            self._merge_pass()
        yield from self._merged(self._active)

    def _merged(self, runs: list[Path]) -> Iterator[bytes]:
        last = b""
        for key in heapq.merge(*(_read_run(p, self.key_size) for p in runs)):
            if key != last:
                last = key
                yield key

    def _merge_pass(self) -> None:
        """Merges the runs FAN_IN at a time into fewer, longer runs (each input removed once
        merged): the final merge reads at most FAN_IN runs at once, whatever their number
        (one read buffer each: 6,000 runs of a 100 TiB gc took 400 MiB)."""
        self._passes += 1
        merged = []
        for at in range(0, len(self._active), FAN_IN):
            group = self._active[at : at + FAN_IN]
            path = self.dir / f"pass-{self._passes}-{at // FAN_IN:06d}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb", buffering=_READ) as f:
                keys = self._merged(group)
                while batch := b"".join(islice(keys, 4096)):
                    f.write(batch)
            for run in group:
                run.unlink()
            merged.append(path)
        self._active = merged

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self._buffer = []
        self._unique = set() if self._unique is not None else None

    def __enter__(self) -> LiveKeys:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _read_run(path: Path, size: int) -> Iterator[bytes]:
    step = _READ - _READ % size
    with open(path, "rb") as f:
        while data := f.read(step):
            for at in range(0, len(data) - size + 1, size):
                yield data[at : at + size]


def spill_parent(repo_id: str) -> Path:
    """Where gc's sorted runs go: the repository's cache directory (a disk, unlike /tmp
    that may be RAM), else (the cache off or not writable) the private one."""
    root = cache_root()
    if root is not None:
        path = repository_cache(root, repo_id) / "gc"
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            return path
        except OSError:
            pass
    return private_dir()
