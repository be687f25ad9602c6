"""The disk's floor under a backup or a restore: how long this machine's storage takes to
read what a step reads and write what it writes, at the same time, with nothing else done
(no hashing, no compression, no encryption), so a benchmark can print how far a tool is from
the disk and the most a speed ratio against a peer could be here.

    .venv/bin/python bench/io_floor.py --read PATH [--read PATH ...] --write-bytes N --dir DIR

Reads: every data extent (SEEK_DATA/SEEK_HOLE: holes cost a tool nothing either) of the
files given or found under the directories given (only the first ones that hold
--read-limit bytes, when given), with O_DIRECT, four threads. Writes:
N bytes of random data into a new file under DIR with O_DIRECT, then fsync (a restore and a
backup both make their writes durable). Both start together after the page cache is dropped;
the floor is the time until both are done. O_DIRECT is dropped (buffered, then fsync) where
the file system refuses it (tmpfs).

Why both at once: on a disk whose reads and writes share one device queue (this machine's
virtual disk), the time for both is about the sum of each alone, not the larger of the two;
measured (2026-12-07): 1.51 GB of packs read in 0.96-1.09 s, 2.40 GB written in 1.18-1.24 s,
both together 2.17-2.21 s (docs/DATA-PATH.md, "The disk under the data path")."""

from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BLOCK = 4 << 20
READERS = 4


def data_extents(path: Path) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data extent of a file (one extent where SEEK_DATA is unknown)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        at = 0
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    return
                yield at, size - at  # no SEEK_DATA here: all of it
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, end - start
            at = end
    finally:
        os.close(fd)


def files_under(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        elif p.is_file():
            out.append(p)
    return out


def _open(path: Path, flags: int) -> tuple[int, bool]:
    """A descriptor with O_DIRECT where the file system allows it, and whether it has it."""
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return os.open(path, flags, 0o600), False


def read_file(path: Path) -> int:
    """Bytes of `path`'s data extents read (aligned to the page for O_DIRECT)."""
    buf = mmap.mmap(-1, BLOCK)
    fd, _ = _open(path, os.O_RDONLY)
    done = 0
    try:
        for start, length in data_extents(path):
            at, end = start - start % mmap.PAGESIZE, start + length
            while at < end:
                want = min(BLOCK, -(-(end - at) // mmap.PAGESIZE) * mmap.PAGESIZE)
                n = os.preadv(fd, [memoryview(buf)[:want]], at)
                if n <= 0:
                    break
                done += min(n, end - at)
                at += n
    finally:
        os.close(fd)
        buf.close()
    return done


def write_bytes(path: Path, total: int) -> int:
    buf = mmap.mmap(-1, BLOCK)
    buf.write(os.urandom(BLOCK))
    fd, direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    done = 0
    try:
        while done < total:
            size = min(BLOCK, total - done)
            if direct and size % mmap.PAGESIZE:  # the unaligned tail, buffered
                os.close(fd)
                fd, direct = os.open(path, os.O_WRONLY), False
            done += os.pwrite(fd, memoryview(buf)[:size], done)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
    return done


def drop_caches() -> str | None:
    """Drop the page cache; returns why it could not, or None (every bench uses this one,
    through bench/core.py)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return None
    except OSError as exc:
        return f"cannot drop the page cache ({exc.strerror}): timings are warm-cache"


def first_files(files: list[Path], limit: int | None) -> list[Path]:
    """The first files that together hold `limit` bytes (all with None)."""
    if limit is None:
        return files
    out: list[Path] = []
    total = 0
    for f in files:
        if total >= limit:
            break
        out.append(f)
        total += f.stat().st_size
    return out


def floor(
    read: list[Path], write: int, workdir: Path, read_limit: int | None = None
) -> dict[str, Any]:
    """Reads and writes together (module docstring); the written file is removed.
    `read_limit`: read only the first files that hold that many bytes (a restore of the
    latest point reads about a full's worth of a repository that also holds older data)."""
    files = first_files(files_under(read), read_limit)
    target = workdir / f".io-floor-{os.getpid()}"
    dropped = drop_caches() is None
    began = time.perf_counter()
    written = [0]
    writer = threading.Thread(target=lambda: written.__setitem__(0, write_bytes(target, write)))
    writer.start()
    try:
        with ThreadPoolExecutor(READERS) as pool:
            read_total = sum(pool.map(read_file, files))
    finally:
        writer.join()
        target.unlink(missing_ok=True)
    return {
        "seconds": time.perf_counter() - began,
        "read_bytes": read_total,
        "write_bytes": written[0],
        "page_cache_dropped": dropped,
    }


def least(
    read: list[Path], write: int, workdir: Path, read_limit: int | None = None, runs: int = 2
) -> dict[str, Any]:
    """The fastest of `runs` floors: a floor is the least the disk takes."""
    floors = (floor(read, write, workdir, read_limit) for _ in range(runs))
    return min(floors, key=lambda f: f["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--read", type=Path, action="append", default=[], help="file or dir")
    parser.add_argument("--write-bytes", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=Path("."), help="where to write")
    parser.add_argument("--read-limit", type=int, help="read only this many bytes' files")
    parser.add_argument("--runs", type=int, default=2, help="the fastest of this many")
    args = parser.parse_args()
    found = least(args.read, args.write_bytes, args.dir, args.read_limit, args.runs)
    print(json.dumps(found))


if __name__ == "__main__":
    main()
