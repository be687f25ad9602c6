"""libvirt benchmark (not named libvirt.py: run as a script, that would shadow the libvirt
bindings): vmkeep's live full and delta backups of a running domain against restic
backing up the domain's disk image file, in one run, on the same data.

    .venv/bin/python bench/libvirt_live.py [--size-gib 4] [--change-block 65536]
                                           [--chunk-sizes 4M,256K] [--json] [--keep]

A guest-less domain (TCG) gets a qcow2 disk (compat 1.1) prefilled before it starts with the
core benchmark's image (bench/image.py: half allocated, half of that compressible). Then:
vmkeep full backup (pull-mode job over NBD, base:allocation) and restic's first backup of the
qcow2 file; 1% of the disk rewritten in scattered blocks *through the running VM's block layer*
(QEMU monitor, qemu-io), which the checkpoint's dirty bitmap records; vmkeep delta backup (only
the dirty chunks are read) and restic's second backup of the same file. Each delta point is
restored and compared with the disk (qemu-img compare). Page cache dropped before each step.

vmkeep runs once per repository chunk size (`vmkeep init --chunk-size`; default: the 4 MiB
default and 256 KiB), each into its own repository, one after the other on the same domain
(`--keep-checkpoints` keeps every repository's checkpoint), so each size gets its own ratios.

Why restic gets the qcow2 file: it is the file a file-level tool would back up on this host,
and it holds only the allocated data (~half the disk), so restic reads less than it would from
a raw image with holes: the comparison is the one most favourable to restic. restic has no
change tracking: its second backup re-reads and re-chunks the whole file.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from core import (
    PASSPHRASE,
    Run,
    dir_bytes,
    drop_caches,
    ensure_peers,
    in_helper,
    last_line,
    run,
    run_in_workdir,
    speaker,
)
from image import GiB, MiB, build_image, plan_change
from vmkeep.errors import UsageError
from vmkeep.interfaces.cli.repo_commands import parse_chunk_size

ROOT = Path("/var/lib/libvirt/images")
QEMU_LOG = Path("/var/log/libvirt/qemu")
URI = "qemu:///system"
TARGETS = {"delta": 20.0, "full": 3.0}  # vmkeep at least N times faster than restic


def domain_xml(name: str, image: Path) -> str:
    return f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{image}'/><target dev='vda' bus='virtio'/></disk>
    <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>"""


@contextmanager
def running_domain(name: str, image: Path) -> Iterator[Any]:
    """A started guest-less domain; destroyed and undefined (with checkpoints) on exit."""
    import libvirt

    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open(URI)
    try:
        dom = conn.defineXML(domain_xml(name, image))
        dom.create()
        yield dom
    finally:
        remove_domain(name)
        with suppress(libvirt.libvirtError):
            conn.close()


def remove_domain(name: str) -> None:
    """On a fresh connection: the first one may have died with a libvirtd restart."""
    import libvirt

    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(name)
        with suppress(libvirt.libvirtError):
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


def guest_writes(dom: Any, offsets: list[int], block: int) -> float:
    """Rewrite `block` bytes at each offset through the VM's virtio-blk device (qemu-io in the
    QEMU monitor; it prints to the domain log, which is awaited). Returns the seconds taken."""
    import libvirt_qemu

    alias = ET.fromstring(dom.XMLDesc(0)).find("./devices/disk/alias")
    device = f"/machine/peripheral/{alias.get('name') if alias is not None else ''}/virtio-backend"
    log = QEMU_LOG / f"{dom.name()}.log"
    done = f"wrote {block}/{block} bytes".encode()
    before, before_done = log.read_bytes().count(b"wrote "), log.read_bytes().count(done)
    began = time.perf_counter()
    for i, off in enumerate(offsets):
        command = f'qemu-io -d {device} "write -P {1 + i % 254:#x} {off} {block}"'
        libvirt_qemu.qemuMonitorCommand(
            dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
    deadline = time.monotonic() + 60
    while log.read_bytes().count(done) - before_done < len(offsets):  # this call's writes
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest writes did not all complete (see {log})")
        time.sleep(0.05)
    if log.read_bytes().count(b"wrote ") - before != len(offsets):
        raise RuntimeError(f"unexpected qemu-io output in {log}")
    return time.perf_counter() - began


class Steps:
    """The timed subprocesses of one run, by label."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.runs: dict[str, Run] = {}
        self.outputs: dict[str, Any] = {}

    def __call__(self, label: str, argv: list[str], env: dict[str, str]) -> Run:
        drop_caches()
        result = self.runs[label] = run(argv, env)
        if result.returncode:
            raise RuntimeError(f"{label} failed (exit {result.returncode}): "
                               f"{last_line(result.stderr)}")  # fmt: skip
        if argv[1:2] == ["backup"] and "--json" in argv:
            self.outputs[label] = json.loads(result.stdout)
        self.say(f"{label}: {result.seconds:.2f} s, peak RSS {result.rss_mib:.0f} MiB")
        return result


def benchmark(
    work: Path,
    size: int,
    block: int,
    chunk_sizes: dict[str, int],
    seed: int,
    install: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    if ensure_peers(install, say)["restic"] is not None:
        raise RuntimeError("restic is not available: it is what this benchmark compares with")
    raw, image = work / "prefill.raw", work / "vda.qcow2"
    say(f"building a {size / GiB:g} GiB image, half allocated, into {image}")
    layout = in_helper(build_image, str(raw), size, seed)
    subprocess.run(
        ["qemu-img", "convert", "-O", "qcow2", "-o", "compat=1.1", str(raw), str(image)],
        check=True,
    )
    raw.unlink()
    change = plan_change(layout, 0.01 * 64 * 1024 / block, seed) if block else []
    vmkeep = str(Path(sys.executable).with_name("vmkeep"))
    venv = {"VMKEEP_PASSPHRASE": PASSPHRASE, "VMKEEP_CONFIG_DIR": f"{work}/config"}
    env_v = dict(os.environ, **venv)
    env_r = dict(os.environ, RESTIC_PASSWORD=PASSPHRASE, RESTIC_CACHE_DIR=f"{work}/cache-restic")
    repo_r = work / "repo-restic"
    repos_v = {label: work / f"repo-vmkeep-{label}" for label in chunk_sizes}
    keep = str(len(chunk_sizes))  # every repository's checkpoint stays for its delta
    steps = Steps(say)
    name = work.name

    def backup(label: str, *extra: str) -> list[str]:
        return [vmkeep, "backup", name, "--connector", "libvirt", "--remote",
                str(repos_v[label]), "--keep-checkpoints", keep, "--json", *extra]  # fmt: skip

    with running_domain(name, image) as dom:
        for label, repo in repos_v.items():
            steps(f"vmkeep init {label}", [vmkeep, "init", str(repo), "--chunk-size", label], env_v)
            steps(f"vmkeep full {label}", backup(label), env_v)
        steps("restic init", ["restic", "-r", str(repo_r), "init"], env_r)
        steps("restic 1st", ["restic", "-r", str(repo_r), "backup", str(image)], env_r)
        say(f"rewriting {len(change)} blocks of {block} bytes through the running VM")
        change = sorted({min(o // 4096 * 4096, size - block) for o in change})
        write_seconds = guest_writes(dom, change, block)
        for label in repos_v:
            steps(f"vmkeep delta {label}", backup(label, "--mode", "delta"), env_v)
        steps("restic 2nd", ["restic", "-r", str(repo_r), "backup", str(image)], env_r)
        repo_bytes = {"restic": dir_bytes(repo_r)}
        same: dict[str, bool] = {}
        for label, repo in repos_v.items():
            repo_bytes[f"vmkeep {label}"] = dir_bytes(repo)
            point = steps.outputs[f"vmkeep delta {label}"]["restore_point"]
            restored = work / f"restored-{label}"
            steps(f"vmkeep restore {label}", [vmkeep, "restore", point, "--remote", str(repo),
                                              "--to", str(restored), "--json"], env_v)  # fmt: skip
            (disk,) = (p for p in restored.rglob("*") if p.is_file() and p.name != "vm.json")
            compare = subprocess.run(["qemu-img", "compare", "-U", "-q", str(disk), str(image)])
            same[label] = compare.returncode == 0
            shutil.rmtree(restored)
    result = report(steps, chunk_sizes, size, layout.allocated, change, block, write_seconds)
    result["repo_bytes"] = repo_bytes
    result["domain"] = name  # also the work directory's name
    result["restore_ok"] = same
    return result


def touched_chunks(change: list[int], block: int, chunk: int) -> int:
    return len({i for o in change for i in range(o // chunk, (o + block - 1) // chunk + 1)})


def report(
    steps: Steps,
    chunk_sizes: dict[str, int],
    size: int,
    allocated: int,
    change: list[int],
    block: int,
    write_seconds: float,
) -> dict[str, Any]:
    t = {k: r.seconds for k, r in steps.runs.items()}
    per_size: dict[str, Any] = {}
    for label, chunk in chunk_sizes.items():
        full_ratio = t["restic 1st"] / t[f"vmkeep full {label}"]
        delta_ratio = t["restic 2nd"] / t[f"vmkeep delta {label}"]
        delta = steps.outputs[f"vmkeep delta {label}"]
        per_size[label] = {
            "chunk_size": chunk,
            "touched_chunks": touched_chunks(change, block, chunk),
            "full_bytes_read": steps.outputs[f"vmkeep full {label}"]["bytes_read"],
            "delta_bytes_read": delta["bytes_read"],
            "delta_notes": delta["notes"],
            "full: restic 1st / vmkeep full": round(full_ratio, 2),
            "delta: restic 2nd / vmkeep delta": round(delta_ratio, 2),
            "targets": {
                "full >= 3x": full_ratio >= TARGETS["full"],
                "delta >= 20x": delta_ratio >= TARGETS["delta"],
            },
        }
    return {
        "image": {"size": size, "allocated": allocated, "format": "qcow2 (compat 1.1)"},
        "change": {
            "blocks": len(change),
            "block_bytes": block,
            "bytes": len(change) * block,
            "guest_write_seconds": round(write_seconds, 2),
        },
        "steps": {k: r.summary(size) for k, r in steps.runs.items()},
        "vmkeep": per_size,
    }


def print_report(result: dict[str, Any]) -> None:
    s, c = result["steps"], result["change"]
    print(f"\nlibvirt benchmark: {result['image']['size'] / GiB:g} GiB qcow2 disk of a running "
          f"domain, {result['image']['allocated'] / GiB:.2f} GiB allocated; change: "
          f"{c['blocks']} x {c['block_bytes'] // 1024} KiB = {c['bytes'] / MiB:.0f} MiB "
          "through the VM")  # fmt: skip
    print(f"{'step':<24}{'seconds':>10}{'CPU s':>8}{'peak RSS MiB':>14}")
    for label, x in s.items():
        if "init" not in label:
            print(f"{label:<24}{x['seconds']:>10.2f}{x['cpu_seconds']:>8.1f}"
                  f"{x['peak_rss_mib']:>14.0f}")  # fmt: skip
    for label, v in result["vmkeep"].items():
        print(f"vmkeep, {label} chunks: read {v['full_bytes_read'] / MiB:.0f} MiB (full), "
              f"{v['delta_bytes_read'] / MiB:.0f} MiB (delta: {v['touched_chunks']} chunks "
              "touched)")  # fmt: skip
        ratios = [(k, x) for k, x in v.items() if k.startswith(("full:", "delta:"))]
        for (name, value), (target, met) in zip(ratios, v["targets"].items(), strict=True):
            print(f"  {name}: {value:.2f}x   target {target}: {'PASS' if met else 'MISS'}")
        same = result["restore_ok"][label]
        print(f"  restore of the delta point == disk: {'OK' if same else 'MISMATCH'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vmkeep live backups vs restic, libvirt domain")
    parser.add_argument("--size-gib", type=float, default=4.0, help="disk size (default 4)")
    parser.add_argument(
        "--change-block", type=int, default=64 * 1024, help="bytes per scattered guest write"
    )
    parser.add_argument(
        "--chunk-sizes", default="4M,256K", help="vmkeep repositories' chunk sizes (init)"
    )
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-install", action="store_true", help="never apt-get restic")
    args = parser.parse_args(argv)
    size = int(args.size_gib * GiB) // MiB * MiB
    if size < 16 * MiB or args.change_block % 4096 or args.change_block <= 0:
        parser.error("--size-gib >= 1/64 and --change-block a positive multiple of 4096")
    try:
        chunk_sizes = {label: parse_chunk_size(label) for label in args.chunk_sizes.split(",")}
    except UsageError as exc:
        parser.error(str(exc))
    say = speaker(args.json)
    if os.geteuid() != 0:
        parser.error("needs root (libvirt system URI, page cache drop)")
    work = ROOT / f"vmkeep-bench-{os.getpid()}-{secrets.token_hex(3)}"
    work.mkdir(mode=0o755)

    def measure() -> dict[str, Any]:
        result = benchmark(
            work, size, args.change_block, chunk_sizes, args.seed, not args.no_install, say
        )
        return {**result, "ok": all(result["restore_ok"].values())}

    return run_in_workdir(work, args, measure, print_report, say)


if __name__ == "__main__":
    sys.exit(main())
