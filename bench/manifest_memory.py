"""Memory of encoding and decoding one big manifest, each case in a fresh process.

    python bench/manifest_memory.py [--chunks 512Ki,2Mi] [--plain] [--stream 3]

A fully allocated disk of N 4 MiB chunks (512 Ki chunks = 2 TiB, 2 Mi = 8 TiB) has an ID table
of N x 32 bytes. For encode and decode this prints the tracemalloc peak above what was held
before the call (the transient copies) and the process's peak RSS, both also as multiples of
the ID table (docs/DATA-PATH.md, "Manifest memory"). `--stream N` also writes N such points
to an unencrypted local repository under /tmp (removed after) and reads them all as gc's mark
and verify do (manifest_stream.feed_referenced) in a fresh process: its peak RSS.
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
import tracemalloc
from datetime import UTC, datetime

from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.crypto import RepositoryKey, Sealer
from vmkeep.repository.format import DEFAULT_CHUNK_SIZE
from vmkeep.repository.manifest import (
    DiskIndex,
    Manifest,
    decode_manifest,
    encode_manifest,
    new_point_id,
)

MIB = 1 << 20


def _manifest(chunks: int) -> Manifest:
    now = datetime.now(UTC)
    disk = DiskIndex("vda", chunks * DEFAULT_CHUNK_SIZE, "qcow2", [(0, os.urandom(chunks * 32))])
    return Manifest(new_point_id(now), {"name": "big", "uuid": "u"}, [disk], "full", now, now)


def _measure(op: str, chunks: int, encrypted: bool) -> dict[str, float]:
    """One case in this process: (transient peak, RSS) in MiB."""
    sealer = Sealer(RepositoryKey.generate() if encrypted else None)
    manifest = _manifest(chunks)
    blob = encode_manifest(sealer, manifest) if op == "decode" else b""
    point_id = manifest.id
    if op == "decode":
        del manifest
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    if op == "encode":
        result: object = encode_manifest(sealer, manifest)
    else:
        result = decode_manifest(sealer, point_id, blob, DEFAULT_CHUNK_SIZE)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del result
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak": peak / MIB, "rss": rss}


def _stream(path: str) -> dict[str, float]:
    """Every point's chunk IDs read as gc's mark reads them (the IDs dropped: the external
    sort they feed is measured by bench/gc_plan_scale.py)."""
    from vmkeep.repository.manifest_stream import feed_referenced
    from vmkeep.repository.repository import Repository

    repo = Repository.open(LocalRemote(path), lambda: b"")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    points, problems = feed_referenced(repo, lambda ids: sum(1 for _ in ids) and None)
    assert points > 0 and not problems
    return {"before": before, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _write_points(path: str, chunks: int, count: int) -> None:
    from vmkeep.repository.repository import Repository

    repo = Repository.init(LocalRemote(path), "none", lambda: b"")
    for _ in range(count):
        repo.save_manifest(_manifest(chunks))


def _stream_case(chunks: int, count: int) -> dict[str, float]:
    root = tempfile.mkdtemp(prefix="vmkeep-mfmem-")
    try:
        repo = os.path.join(root, "repo")
        # Written by another process: a child's ru_maxrss starts at its parent's RSS.
        write = [sys.executable, __file__, "--one", f"write:{repo}:{chunks}:{count}"]
        subprocess.run(write, check=True, timeout=600)
        args = [sys.executable, __file__, "--one", f"stream:{repo}:0"]
        out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600)
        return dict(json.loads(out.stdout))
    finally:
        shutil.rmtree(root)


def _case(op: str, chunks: int, encrypted: bool) -> dict[str, float]:
    args = [sys.executable, __file__, "--one", f"{op}:{chunks}:{int(encrypted)}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600)
    return dict(json.loads(out.stdout))


def _count(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", default="512Ki,2Mi")
    parser.add_argument("--plain", action="store_true", help="an unencrypted repository")
    parser.add_argument("--stream", type=int, default=0, help="points read as gc does")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        op, what, encrypted, *more = args.one.split(":")
        if op == "write":
            _write_points(what, int(encrypted), int(more[0]))
        elif op == "stream":
            print(json.dumps(_stream(what)))
        else:
            print(json.dumps(_measure(op, int(what), encrypted == "1")))
        return
    for text in args.chunks.split(","):
        chunks = _count(text)
        table = chunks * 32 / MIB
        for op in ("encode", "decode"):
            got = _case(op, chunks, not args.plain)
            print(
                f"{text:>6} chunks ({table:.0f} MiB of IDs) {op}: transient peak "
                f"{got['peak']:.0f} MiB ({got['peak'] / table:.1f}x), "
                f"process peak RSS {got['rss']:.0f} MiB"
            )
        if args.stream:
            got = _stream_case(chunks, args.stream)
            print(
                f"{text:>6} chunks, {args.stream} points read as gc's mark does: peak RSS "
                f"{got['rss']:.0f} MiB ({got['before']:.0f} MiB after imports and open)"
            )


if __name__ == "__main__":
    main()
