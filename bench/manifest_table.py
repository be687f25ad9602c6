"""Peak RSS of writing and reading a restore point of one huge fully allocated disk, manifest
object version 2 (docs/FORMAT.md §5.5) against version 1, each step in a fresh process.

    python bench/manifest_table.py [--ids 2Mi,8Mi,24Mi] [--old 2Mi] [--mark]
        [--mirror] [--mirror-src DIR]

N IDs at 4 MiB chunks is a disk of N x 4 MiB (2 Mi = 8 TiB, 8 Mi = 32 TiB, 24 Mi = 96 TiB).
Steps, in an unencrypted format 3 repository under /tmp (removed after; unencrypted so that
no Argon2 shows in the RSS; the sealing is per piece either way):

- write: the table built as a backup builds it (new: a file table filled a window at a
  time, as chunks complete; old: IndexBuilder's buffer in memory), then save_manifest;
- read: load_manifest and a walk of every ID (entries(), as restore, gc and verify do);
- mark (--mark): gc's mark and verify's first step: every ID into the external sort
  (pack_gc.referenced_sort), then read back sorted (its buffers are a constant ~100 MiB).
- mirror (--mirror, version 2 points only): `vmkeep mirror` of the point into a second
  unencrypted format 3 repository that already holds every chunk (fake recipes indexed
  there beforehand, in an unmeasured step: the IDs are fake, so nothing can be read): what
  is measured is the mirror's own bookkeeping (the walk, the target's lookups, the copy's
  table and its version 2 object), not the chunks' transfer. `--mirror-src DIR` runs this
  step with another tree's vmkeep (e.g. /work/main/src: the mirror before its tables were
  streamed), for a before/after.

`--old` lists the sizes also measured with version 1 (which refuses more than ~6 Mi IDs:
the 256 MiB document bound). Prints the peak RSS of each step, the process's RSS after
imports, the wall and CPU seconds, and the object's size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

from vmkeep.remotes.local import LocalRemote
from vmkeep.repository import manifest, manifest_table
from vmkeep.repository.format import DEFAULT_CHUNK_SIZE, manifest_object_name
from vmkeep.repository.index_runs import IndexBuilder, Run
from vmkeep.repository.manifest import DiskIndex, Manifest, new_point_id
from vmkeep.repository.repository import Repository
from vmkeep.repository.table_builder import FileTable, file_table

MIB = 1 << 20
WINDOW = 32768  # IDs set at a time (a backup sets them one by one; the memory is the same)


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _write(path: str, ids: int, old: bool) -> dict[str, float]:
    repo = Repository.open(LocalRemote(path), lambda: b"")
    before, began, cpu = _rss(), time.monotonic(), _cpu()
    if old:  # version 1 as before: the whole table in memory, encoded in one object
        manifest_table.TABLE_INLINE_MAX_IDS = manifest.TABLE_INLINE_MAX_IDS = 1 << 40
    ranges = [(0, ids)]
    table: IndexBuilder | FileTable = IndexBuilder(ranges) if old else file_table(ranges)
    for at in range(0, ids, WINDOW):
        table.put_run(at, os.urandom(min(WINDOW, ids - at) * 32))
    runs: list[Run] | FileTable = table.runs()
    del table
    now = datetime.now(UTC)
    disk = DiskIndex("vda", ids * DEFAULT_CHUNK_SIZE, "qcow2", runs)
    del runs
    point = Manifest(new_point_id(now), {"name": "big", "uuid": "u"}, [disk], "full", now, now)
    del disk
    repo.save_manifest(point)
    size = os.stat(os.path.join(path, manifest_object_name(point.id))).st_size
    return _done(before, began, cpu, size=size / MIB)


def _read(path: str) -> dict[str, float]:
    repo = Repository.open(LocalRemote(path), lambda: b"")
    (point_id,) = repo.point_ids()
    before, began, cpu = _rss(), time.monotonic(), _cpu()
    loaded = repo.load_manifest(point_id)
    count = sum(1 for disk in loaded.disks for _ in disk.entries())
    return _done(before, began, cpu, ids=count)


def _mark(path: str) -> dict[str, float]:
    from vmkeep.repository.manifest_stream import feed_referenced
    from vmkeep.repository.pack_gc import referenced_sort

    repo = Repository.open(LocalRemote(path), lambda: b"")
    before, began, cpu = _rss(), time.monotonic(), _cpu()
    with referenced_sort(str(repo.config["id"])) as referenced:
        points, problems = feed_referenced(repo, referenced.add_many)
        assert points == 1 and not problems
        count = sum(1 for _ in referenced.sorted_unique())
    return _done(before, began, cpu, ids=count)


def _fill(path: str, target: str) -> dict[str, float]:
    """Index a fake recipe in `target` for every ID of the point (not measured)."""
    from vmkeep.repository.blobs import KIND_RECIPE

    repo = Repository.open(LocalRemote(path), lambda: b"")
    (point_id,) = repo.point_ids()
    dest = Repository.open(LocalRemote(target), lambda: b"")
    assert dest.packed is not None
    before, began, cpu = _rss(), time.monotonic(), _cpu()
    with dest.writing():
        writer, batch = dest.packed.writer, []
        for disk in repo.load_manifest(point_id).disks:
            for _, chunk_id in disk.entries():
                batch.append((chunk_id, b"fake recipe"))
                if len(batch) == WINDOW:
                    writer.add(KIND_RECIPE, batch)
                    batch = []
        writer.add(KIND_RECIPE, batch)
        dest.flush_chunks()
    return _done(before, began, cpu)


def _mirror(path: str, target: str) -> dict[str, float]:
    from vmkeep.operations.mirror import MirrorOptions, mirror
    from vmkeep.progress import SilentProgress

    repo = Repository.open(LocalRemote(path), lambda: b"")
    dest = Repository.open(LocalRemote(target), lambda: b"")
    # The target's index read first (a backup into it pays the same): its share of the peak.
    dest.has_chunk(bytes(32))
    index_rss, index_cpu = _rss(), _cpu()
    before, began, cpu = _rss(), time.monotonic(), _cpu()
    report = mirror(repo, dest, MirrorOptions(mode="full"), SilentProgress())
    (result,) = report.points
    assert result.status == "copied" and result.chunks_uploaded == 0, result
    size = sum(e.stat().st_size for e in os.scandir(os.path.join(target, "manifests")))
    return _done(before, began, cpu, size=size / MIB, index=index_rss, index_cpu=index_cpu)


def _done(before: float, began: float, cpu: float, **more: float) -> dict[str, float]:
    wall, used = time.monotonic() - began, _cpu() - cpu
    return {"before": before, "rss": _rss(), "wall": wall, "cpu": used, **more}


def _child(step: str, *args: str, src: str | None = None) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--one", step, *args]
    env = dict(os.environ, PYTHONPATH=src) if src else None
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600, env=env)
    return dict(json.loads(out.stdout))


def _count(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


def _case(ids: int, old: bool, mark: bool, mirror: list[str | None]) -> None:
    root = tempfile.mkdtemp(prefix="vmkeep-mtable-")
    try:
        repo = os.path.join(root, "repo")
        Repository.init(LocalRemote(repo), "none", lambda: b"", format_version=3)
        label = (
            f"{ids * 32 / MIB:.0f} MiB of IDs, {ids * 4 / MIB:.0f} TiB, version {1 if old else 2}"
        )
        steps = [("write", ["1" if old else "0"]), ("read", [])] + ([("mark", [])] if mark else [])
        for step, extra in steps:
            _report(label, step, _child(step, repo, str(ids), *extra))
        for n, src in enumerate([] if old else mirror):
            target = os.path.join(root, f"target{n}")
            Repository.init(LocalRemote(target), "none", lambda: b"", format_version=3)
            _child("fill", repo, str(ids), target)
            step = "mirror" + (f" ({src})" if src else "")
            _report(label, step, _child("mirror", repo, str(ids), target, src=src))
            shutil.rmtree(target)
    finally:
        shutil.rmtree(root)


def _report(label: str, step: str, got: dict[str, float]) -> None:
    size = f", object {got['size']:.0f} MiB" if "size" in got else ""
    before = f"after imports {got['before']:.0f}"
    if "index" in got:
        before = f"after opening and reading the target's index {got['index']:.0f}"
        size += f" (imports, open and index before it: {got['index_cpu']:.1f} CPU-s)"
    print(
        f"{label}: {step}: peak RSS {got['rss']:.0f} MiB ({before}), "
        f"{got['wall']:.1f} s, {got['cpu']:.1f} CPU-s{size}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ids", default="2Mi,8Mi,24Mi")
    parser.add_argument("--old", default="2Mi", help="sizes also measured with version 1")
    parser.add_argument("--mark", action="store_true", help="also gc's mark (external sort)")
    parser.add_argument("--mirror", action="store_true", help="also a mirror of the point")
    parser.add_argument("--mirror-src", help="also the mirror step with this tree's vmkeep")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        step, path, ids, *more = args.one
        if step == "write":
            print(json.dumps(_write(path, int(ids), more == ["1"])))
        elif step in ("fill", "mirror"):
            print(json.dumps((_fill if step == "fill" else _mirror)(path, more[0])))
        else:
            print(json.dumps(_read(path) if step == "read" else _mark(path)))
        return
    old = {_count(t) for t in args.old.split(",") if t}
    mirror = ([args.mirror_src] if args.mirror_src else []) + ([None] if args.mirror else [])
    for text in args.ids.split(","):
        ids = _count(text)
        if ids in old:
            _case(ids, True, args.mark, [])
        _case(ids, False, args.mark, mirror)


if __name__ == "__main__":
    main()
