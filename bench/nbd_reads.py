"""What QEMU's NBD serving of a live backup costs, by reads in flight and request size: every
data chunk of a running domain's disk read through a pull-mode backup job with vmkeep's NBD
reader, nothing else done with the data (no hashing, no compression), QEMU's CPU-seconds
taken from /proc (docs/DATA-PATH.md, "Wall time of a live full backup and restore").

    .venv/bin/python bench/nbd_reads.py [--size-gib 4] [--threads 1,2,4,8] [--requests 4096,1024]

The disk is bench/image.py's (half allocated); the page cache is dropped before each read.
Root and libvirtd are needed (a guest-less TCG domain of its own is defined and removed)."""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from core import drop_caches, in_helper
from image import GiB, build_image
from libvirt_domains import running_domain
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.transport import nbd_reader
from vmkeep.operations.backup import chunks_with_data
from vmkeep.operations.chunk_extents import merge_gap, read_spans, spans_by_chunk
from vmkeep.parallel import unordered_map
from vmkeep.repository.index_runs import indexes

ROOT = Path("/var/lib/libvirt/images")
CHUNK = 4 << 20
HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def read_all(connector: LibvirtConnector, name: str, threads: int, qemu: int) -> dict[str, float]:
    """One full read of the domain's disk: seconds, bytes, vmkeep's and QEMU's CPU."""
    drop_caches()
    session = connector.begin_backup(connector.get_vm(name), {})
    try:
        reader = next(iter(session.readers.values()))
        flags = chunks_with_data(reader, CHUNK)
        q0, me0, t0 = cpu_seconds(qemu), resource.getrusage(resource.RUSAGE_SELF), time.time()
        spans = spans_by_chunk(reader.extents(), indexes(flags), reader.size, CHUNK,
                               merge_gap(reader))  # fmt: skip

        def work(item: tuple[int, list[tuple[int, int]]]) -> int:
            index, chunk_spans = item
            length = min(CHUNK, reader.size - index * CHUNK)
            return len(read_spans(reader, index * CHUNK, length, chunk_spans, name))

        read = sum(unordered_map(work, spans, threads))
        seconds = time.time() - t0
        me1 = resource.getrusage(resource.RUSAGE_SELF)
        mine = me1.ru_utime + me1.ru_stime - me0.ru_utime - me0.ru_stime
        return {"seconds": seconds, "bytes": read, "cpu": mine, "qemu_cpu": cpu_seconds(qemu) - q0}
    finally:
        session.finish(False)  # no restore point: the job's checkpoint goes too


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--threads", default="1,2,4,8", help="reads in flight")
    parser.add_argument("--requests", default="4096,1024", help="NBD request sizes, KiB")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (libvirt system URI, page cache drop)")
    work = ROOT / f"vmkeep-nbdreads-{os.getpid()}-{secrets.token_hex(3)}"
    work.mkdir(mode=0o755)
    try:
        raw, image = work / "prefill.raw", work / "vda.qcow2"
        in_helper(build_image, str(raw), int(args.size_gib * GiB), 1)
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-o", "compat=1.1", str(raw),
                        str(image)], check=True)  # fmt: skip
        raw.unlink()
        with running_domain(work.name, image):
            qemu = int(Path(f"/run/libvirt/qemu/{work.name}.pid").read_text())
            connector = LibvirtConnector("qemu:///system")
            print("| reads in flight | request | seconds | MiB/s | vmkeep CPU-s | QEMU CPU-s |")
            print("|---|---|---|---|---|---|")
            for kib in (int(k) for k in args.requests.split(",")):
                nbd_reader.REQUEST = kib << 10
                for threads in (int(t) for t in args.threads.split(",")):
                    r = read_all(connector, work.name, threads, qemu)
                    print(f"| {threads} | {kib} KiB | {r['seconds']:.2f} | "
                          f"{r['bytes'] / 2**20 / r['seconds']:.0f} | {r['cpu']:.2f} | "
                          f"{r['qemu_cpu']:.2f} |", flush=True)  # fmt: skip
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
