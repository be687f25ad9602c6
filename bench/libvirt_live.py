"""libvirt benchmark (not named libvirt.py: run as a script, that would shadow the libvirt
bindings): vmkeep's live backups of a running domain side by side with virtnbdbackup (plain
and -z), the libvirt backup tool KVM administrators use, and restic backing up the domain's
disk image file, in one run, on the same data (issue 15's table).

    .venv/bin/python bench/libvirt_live.py [--size-gib 4] [--change-block 65536]
                                           [--chunk-sizes 4M,256K,v3,v3-64K] [--json] [--keep]

A qcow2 disk (compat 1.1) is prefilled with the core benchmark's image (bench/image.py: half
allocated, half of that compressible) and copied for three guest-less domains (TCG): one for
vmkeep and restic, one for virtnbdbackup, one for virtnbdbackup -z, because virtnbdbackup
refuses a domain that carries another tool's checkpoints. Every domain gets the same guest
writes through the running VM's block layer (QEMU monitor, qemu-io), which the dirty bitmaps
record. vmkeep's package is byte-compiled first, as an installed one is (compile_vmkeep).
Steps, the page cache dropped before each timed one:

1. live full backup;
2. delta after 1% of the disk rewritten in scattered blocks (--change-block, 64 KiB);
3. delta after 40 MiB (at most 1/8 of the disk) rewritten in one region (not for -z);
4. delta with no change (vmkeep and virtnbdbackup);
5. restore of the latest point: vmkeep in one step, virtnbdrestore replays its chain of full
   and incrementals, restic restores its last snapshot; each compared with the disk it came
   from (qemu-img compare); restic's restore is timed once more with an fsync of what it
   wrote (restic returns with it in the page cache, vmkeep with it on disk).

vmkeep runs once per repository chunk size (`vmkeep init --chunk-size`; default: the 4 MiB
default and 256 KiB), each into its own repository, one after the other on the same domain
(`--keep-checkpoints` keeps every repository's checkpoint), so each size gets its own ratios.

Why restic gets the qcow2 file: it is the file a file-level tool would back up on this host,
and it holds only the allocated data (~half the disk), so restic reads less than it would from
a raw image with holes: the comparison is the one most favourable to restic. restic has no
change tracking: each of its backups re-reads and re-chunks the whole file.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import io_floor
from core import PASSPHRASE, dir_bytes, ensure_peers, in_helper, run_in_workdir, speaker
from image import GiB, MiB, allocated_bytes, build_image, plan_change
from libvirt_domains import guest_writes, running_domain
from libvirt_report import Steps, print_report, report
from vmkeep.errors import UsageError
from vmkeep.interfaces.cli.repo_commands import parse_chunk_size

ROOT = Path("/var/lib/libvirt/images")
CLUSTERED = 40 * MiB  # the clustered change, at most 1/8 of the disk
CLUSTER_BLOCK = MiB  # written in blocks of this size
PHASES = ("full", "scattered", "clustered", "no-change")


class Run3:
    """One benchmark run: the domains, stores and argv of each tool."""

    def __init__(self, work: Path, chunk_sizes: dict[str, int], steps: Steps) -> None:
        self.work, self.steps, self.name = work, steps, work.name
        self.vmkeep = str(Path(sys.executable).with_name("vmkeep"))
        self.env_v = dict(
            os.environ,
            VMKEEP_PASSPHRASE=PASSPHRASE,
            VMKEEP_CONFIG_DIR=f"{work}/config",
            VMKEEP_CACHE_DIR=f"{work}/cache-vmkeep",
        )
        self.env_r = dict(
            os.environ, RESTIC_PASSWORD=PASSPHRASE, RESTIC_CACHE_DIR=f"{work}/cache-restic"
        )
        self.repos = {label: work / f"repo-vmkeep-{label}" for label in chunk_sizes}
        self.restic = work / "repo-restic"
        self.vnb = {"virtnbdbackup": work / "vnb", "virtnbdbackup -z": work / "vnbz"}
        self.images = {"vmkeep": work / "vda.qcow2"}
        self.images |= {tool: work / f"{d.name}.qcow2" for tool, d in self.vnb.items()}
        self.domains = {"vmkeep": self.name}
        self.domains |= {tool: f"{self.name}-{d.name}" for tool, d in self.vnb.items()}

    def vmkeep_backup(self, phase: str) -> None:
        keep = str(len(self.repos))  # every repository's checkpoint stays for its delta
        for label, repo in self.repos.items():
            argv = [self.vmkeep, "backup", self.name, "--connector", "libvirt", "--remote",
                    str(repo), "--keep-checkpoints", keep, "--json"]  # fmt: skip
            if phase != "full":
                argv += ["--mode", "delta"]
            self.steps(f"vmkeep {label} {phase}", argv, self.env_v, store=repo)

    def vnb_backup(self, tool: str, phase: str) -> None:
        out = self.vnb[tool]
        argv = ["virtnbdbackup", "-d", self.domains[tool], "-o", str(out), "-n",
                "-l", "full" if phase == "full" else "inc"]  # fmt: skip
        if tool.endswith("-z"):
            argv.append("-z")
        self.steps(f"{tool} {phase}", argv, dict(os.environ), store=out)

    def restic_backup(self, phase: str) -> None:
        argv = ["restic", "-r", str(self.restic), "backup", str(self.images["vmkeep"])]
        self.steps(f"restic {phase}", argv, self.env_r, store=self.restic)

    def phase(self, phase: str) -> None:
        self.vmkeep_backup(phase)
        self.vnb_backup("virtnbdbackup", phase)
        if phase in ("full", "scattered"):
            self.vnb_backup("virtnbdbackup -z", phase)
        if phase != "no-change":
            self.restic_backup(phase)

    def restores(self) -> dict[str, bool]:
        """Restore each tool's latest point and compare it with the disk it came from."""
        same: dict[str, bool] = {}
        image = self.images["vmkeep"]
        for label, repo in self.repos.items():
            point = self.steps.outputs[f"vmkeep {label} no-change"]["restore_point"]
            to = self.work / f"restored-{label}"
            self.steps(f"vmkeep {label} restore", [self.vmkeep, "restore", point, "--remote",
                       str(repo), "--to", str(to), "--json"], self.env_v)  # fmt: skip
            written = allocated_bytes(str(restored_file(to)))
            full = self.steps.stored[f"vmkeep {label} full"]  # what the latest point reads, about
            floor = in_helper(io_floor.least, [repo], written, self.work, full)
            self.steps.floors[label] = floor
            same[f"vmkeep {label}"] = equal(to, image)
        to = self.work / "restored-vnb"
        argv = ["virtnbdrestore", "-i", str(self.vnb["virtnbdbackup"]), "-o", str(to), "-n",
                "-L", str(self.work / "virtnbdrestore.log")]  # fmt: skip
        self.steps("virtnbdbackup restore", argv, dict(os.environ))
        same["virtnbdbackup"] = equal(to, self.images["virtnbdbackup"])
        to = self.work / "restored-restic"
        argv = ["restic", "-r", str(self.restic), "restore", "latest", "--target", str(to)]
        self.steps("restic restore", argv, self.env_r)
        same["restic"] = equal(to, image)
        self.restic_restore_synced()
        return same

    def restic_restore_synced(self) -> None:
        """restic 0.14 returns with what it restored still in the page cache (no fsync);
        vmkeep's restore returns with it on disk. Timed again with an fsync of every restored
        file, for a ratio of the same work (shown beside the issue's, without a target)."""
        to = self.work / "restored-restic-synced"
        script = 'restic -r "$1" restore latest --target "$2" && find "$2" -type f -exec sync {} +'
        argv = ["sh", "-c", script, "sh", str(self.restic), str(to)]
        self.steps("restic restore + fsync", argv, self.env_r)
        shutil.rmtree(to)


def restored_file(directory: Path) -> Path:
    """The one disk image a restore wrote under `directory`."""
    found = [p for p in directory.rglob("*") if p.is_file() and p.suffix not in (".json",
             ".xml", ".log", ".sh", ".txt")]  # fmt: skip
    if len(found) != 1:
        raise RuntimeError(f"expected one restored image under {directory}, found {found}")
    return found[0]


def equal(restored: Path, image: Path) -> bool:
    """The restore under `restored` (a directory, removed after) holds what the guest sees
    (qemu-img compare; -U: the domain runs)."""
    disk = restored_file(restored)
    done = subprocess.run(["qemu-img", "compare", "-U", "-q", str(disk), str(image)])
    shutil.rmtree(restored)
    return done.returncode == 0


def clustered_offsets(size: int) -> list[int]:
    """CLUSTERED bytes (at most size/8) in CLUSTER_BLOCK blocks from the middle of the disk."""
    length = max(CLUSTER_BLOCK, min(CLUSTERED, size // 8) // CLUSTER_BLOCK * CLUSTER_BLOCK)
    start = size // 2 // CLUSTER_BLOCK * CLUSTER_BLOCK
    return list(range(start, start + length, CLUSTER_BLOCK))


def prepare_images(r: Run3, size: int, seed: int, say: Callable[[str], None]) -> Any:
    raw = r.work / "prefill.raw"
    say(f"building a {size / GiB:g} GiB image, half allocated, into {r.images['vmkeep']}")
    layout = in_helper(build_image, str(raw), size, seed)
    convert = ["qemu-img", "convert", "-O", "qcow2", "-o", "compat=1.1", str(raw)]
    for image in r.images.values():  # identical disks, one per tool's domain
        subprocess.run([*convert, str(image)], check=True)
    raw.unlink()
    return layout


def data_bytes(image: Path) -> int:
    """What the qcow2 image holds as data (qemu-img map): less than the layout's allocated
    bytes when qemu-img convert left all-zero clusters unallocated."""
    out = subprocess.run(["qemu-img", "map", "--output=json", str(image)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return sum(e["length"] for e in json.loads(out.stdout) if e["data"])


def compile_vmkeep(say: Callable[[str], None]) -> None:
    """Byte-compile the vmkeep package the measured commands import, as an installed package
    is (pip and Debian's python3 packages compile at install; virtnbdbackup's modules are).
    With PYTHONDONTWRITEBYTECODE set, as on these machines, every vmkeep step compiled its
    ~130 modules from source again: ~0.1 CPU-s of each step (docs/RUN-OVERHEAD.md)."""
    import compileall

    import vmkeep

    package = Path(vmkeep.__file__).parent
    say(f"byte-compiling {package}")
    compileall.compile_dir(package, quiet=1)


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
    if shutil.which("virtnbdbackup") is None or shutil.which("virtnbdrestore") is None:
        raise RuntimeError("virtnbdbackup is not installed (apt-get install virtnbdbackup)")
    compile_vmkeep(say)
    steps = Steps(say)
    r = Run3(work, chunk_sizes, steps)
    layout = prepare_images(r, size, seed, say)
    data = data_bytes(r.images["vmkeep"])
    scattered = plan_change(layout, 0.01 * 64 * 1024 / block, seed) if block else []
    scattered = sorted({min(o // 4096 * 4096, size - block) for o in scattered})
    clustered = clustered_offsets(size)
    writes: dict[str, float] = {}
    with ExitStack() as stack:
        doms = {t: stack.enter_context(running_domain(r.domains[t], r.images[t])) for t in r.images}
        for label, repo in r.repos.items():
            steps(f"vmkeep {label} init", [r.vmkeep, "init", str(repo), *init_options(label)],
                  r.env_v)  # fmt: skip
        steps("restic init", ["restic", "-r", str(r.restic), "init"], r.env_r)
        r.phase("full")
        say(f"rewriting {len(scattered)} blocks of {block} bytes through the running VMs")
        writes["scattered"] = max(guest_writes(d, scattered, block) for d in doms.values())
        r.phase("scattered")
        say(f"rewriting {len(clustered)} MiB in one region through the running VMs")
        writes["clustered"] = max(
            guest_writes(doms[t], clustered, CLUSTER_BLOCK) for t in ("vmkeep", "virtnbdbackup")
        )
        r.phase("clustered")
        r.phase("no-change")
        same = r.restores()
    change = {"scattered": (scattered, block), "clustered": (clustered, CLUSTER_BLOCK)}
    result = report(steps, chunk_sizes, size, layout.allocated, change, writes)
    result["repo_bytes"] = {"restic": dir_bytes(r.restic)}
    result["repo_bytes"] |= {f"vmkeep {label}": dir_bytes(p) for label, p in r.repos.items()}
    result["repo_bytes"] |= {tool: dir_bytes(p) for tool, p in r.vnb.items()}
    result["image"]["data"] = data
    result["domain"] = r.name  # also the work directory's name
    result["restore_ok"] = same
    return result


def init_options(label: str) -> list[str]:
    """`vmkeep init` options of a repository variant: a chunk size (format 1 at 4M, else 2,
    e.g. "256K"; explicit, as init's default is format 3), or "v3" / "v3-64K" for format 3
    (packs) with its default or the given block size."""
    if label == "v3":
        return ["--format", "3"]
    if label.startswith("v3-"):
        return ["--format", "3", "--block-size", label[3:]]
    one = label.upper().removesuffix("IB") in ("4M", "4096K")
    return ["--chunk-size", label, "--format", "1" if one else "2"]


def variant_chunk_size(label: str) -> int:
    """The chunk size (index unit) of a variant: format 3 keeps the 4 MiB default."""
    if label == "v3" or label.startswith("v3-"):
        parse_chunk_size(label[3:] or "4M")  # a bad block size fails here, before any work
        return 4 * MiB
    return parse_chunk_size(label)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="vmkeep live backups vs virtnbdbackup and restic, libvirt domain"
    )
    parser.add_argument("--size-gib", type=float, default=4.0, help="disk size (default 4)")
    parser.add_argument(
        "--change-block", type=int, default=64 * 1024, help="bytes per scattered guest write"
    )
    parser.add_argument(
        "--chunk-sizes",
        default="4M,256K",
        help="vmkeep repositories: chunk sizes (init --chunk-size), v3 or v3-BLOCK (--format 3)",
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
        chunk_sizes = {label: variant_chunk_size(label) for label in args.chunk_sizes.split(",")}
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
