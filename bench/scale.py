"""Scale benchmark: the commands that look at every restore point, on a repository of N points.

    .venv/bin/python bench/scale.py [--points 10000] [--vms 50] [--prune-points 250]
                                    [--remotes local,s3] [--src DIR] [--workdir DIR] [--keep]
                                    [--json]

For each remote (a local directory; SeaweedFS on loopback, started as tests/remotes/s3_server.py
starts it), an encrypted repository is filled in-process with N restore points of `--vms` small
VMs (manifests written straight through the repository API, each point a 16 MiB disk of four
chunks: three the VM's points share, one of its own, all stored as small objects), plus one
real VM (a 64 MiB image) backed up once with the CLI. Then each command below runs as its own
`vmkeep` process, timed with os.wait4 (wall time, CPU time, peak RSS of the child):

  list (cold)      `vmkeep list --json`, with an empty cache of point summaries
  list (warm)      the same again: only the listing of manifests/ is read
  prune --dry-run  a policy that would drop --prune-points points (keep-last per VM)
  backup           a full read of the real VM after one chunk changed (finds its previous
                   point among the N, dedups against it)
  prune            the same policy, for real (deletes --prune-points manifests)
  gc --dry-run     marks every chunk the remaining points reference
  verify POINT     the backup's restore point

`--src DIR` runs the CLI from another checkout's sources (PYTHONPATH), e.g. main's before this
change, to print before/after numbers from one build of the repository (the format is the
same). Numbers of 2026-12-06 are in docs/SCALE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from core import PASSPHRASE, Run, prepare_workdir, run, run_in_workdir, speaker, write_vm
from remotes import Server, Unavailable, start_local, start_s3, stopped_on_sigterm
from vmkeep.parallel import io_threads
from vmkeep.remotes.location import open_remote
from vmkeep.repository.format import manifest_object_name
from vmkeep.repository.manifest import DiskIndex, Manifest, encode_manifest, new_point_id
from vmkeep.repository.repository import Repository

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KINDS = ("local", "s3")
STARTERS = {"local": start_local, "s3": start_s3}
MiB = 1 << 20
CHUNK = 4 * MiB
STEPS = ("list_cold", "list_warm", "prune_dry_run", "backup", "prune", "gc_dry_run", "verify")
LABELS = {
    "list_cold": "list (cold cache)",
    "list_warm": "list (warm cache)",
    "prune_dry_run": "prune --dry-run",
    "backup": "backup (1 chunk changed)",
    "prune": "prune",
    "gc_dry_run": "gc --dry-run",
    "verify": "verify POINT",
}


# --- building the repository ----------------------------------------------------------------


def build_points(repo: Repository, points: int, vms: int, say: Any, index_chunks: int = 4) -> float:
    """`points` restore points over `vms` VMs, newest last, a minute apart, written in
    parallel; returns the seconds it took. With `index_chunks` above 4, each disk's index
    holds that many chunk IDs (a big disk), of which only the point's own chunk is stored:
    for measuring gc's memory, not for verify."""
    began = time.perf_counter()
    start = datetime.now(UTC) - timedelta(minutes=points + 10)
    shared = [_base(repo, v, index_chunks - 1) for v in range(vms)]

    def one(i: int) -> None:
        vm = i % vms
        own = _chunk(repo, f"point {i}")
        when = start + timedelta(minutes=i)
        manifest = Manifest(
            id=new_point_id(when),
            vm={"name": f"vm{vm:03d}", "uuid": f"00000000-0000-4000-8000-{vm:012d}"},
            disks=[DiskIndex("disk0", index_chunks * CHUNK, "raw", shared[vm] + own)],
            mode="full" if i < vms else "delta",
            created=when,
            finished=when + timedelta(seconds=2),
            schedule="daily",
            stats={"bytes_read": CHUNK, "bytes_new": 4096, "bytes_written": 4200},
        )
        blob = encode_manifest(repo.sealer, manifest)
        repo.remote.put(manifest_object_name(manifest.id), blob, overwrite=False)

    with ThreadPoolExecutor(io_threads(repo.remote.url)) as pool:
        for done, _ in enumerate(pool.map(one, range(points)), 1):
            if done % 2000 == 0:
                say(f"  {done} points written")
    repo.remote.flush()
    return time.perf_counter() - began


def _base(repo: Repository, vm: int, count: int) -> bytes:
    """The chunk IDs a VM's points share: stored when few, synthetic when many."""
    if count <= 3:
        return b"".join(_chunk(repo, f"vm {vm} base {k}") for k in range(count))
    return b"".join(repo.chunk_id(f"vm {vm} base {k}".encode()) for k in range(count))


def _chunk(repo: Repository, text: str) -> bytes:
    """A small stored chunk (4 KiB): gc and verify see real, decodable objects."""
    data = (text.encode() * (4096 // len(text) + 1))[:4096]
    chunk_id = repo.chunk_id(data)
    repo.put_chunk(chunk_id, data, 1)
    return chunk_id


def write_real_vm(work: Path) -> Path:
    vm_dir = work / "vms" / "bench"
    image = write_vm(vm_dir)
    with open(image, "wb") as f:
        f.write(os.urandom(16 * MiB))
        f.truncate(64 * MiB)
    return vm_dir


def change_one_chunk(vm_dir: Path) -> None:
    with open(vm_dir / "disk0.img", "r+b") as f:
        f.write(os.urandom(CHUNK))


# --- the timed commands ---------------------------------------------------------------------


def vmkeep_argv() -> list[str]:
    exe = Path(sys.executable).with_name("vmkeep")
    return [str(exe)] if exe.exists() else ["vmkeep"]


def measure_remote(
    server: Server, work: Path, args: argparse.Namespace, say: Any
) -> dict[str, Any]:
    remote = open_remote(server.url, server.env)
    repo = Repository.init(remote, "aes-256-gcm", lambda: PASSPHRASE.encode())
    say(f"{server.kind}: writing {args.points} restore points of {args.vms} VMs")
    build = build_points(repo, args.points, args.vms, say, args.index_chunks)
    vm_dir = write_real_vm(work / server.kind)
    env = dict(
        os.environ,
        **server.env,
        VMKEEP_PASSPHRASE=PASSPHRASE,
        VMKEEP_CONFIG_DIR=str(work / server.kind / "config"),
        VMKEEP_DATA_DIR=str(work / server.kind / "data"),
        VMKEEP_CACHE_DIR=str(work / server.kind / "cache-setup"),
        PYTHONPATH=str(args.src),
    )
    vmkeep = vmkeep_argv()
    at = ["--remote", server.url]
    first = run([*vmkeep, "backup", str(vm_dir), *at, "--mode", "full", "--json"], env)
    if first.returncode:
        raise RuntimeError(f"setup backup failed: {first.stderr.strip()[-300:]}")
    change_one_chunk(vm_dir)
    env["VMKEEP_CACHE_DIR"] = str(work / server.kind / "cache")
    per_vm = args.points // args.vms
    keep = ["--keep-last", str(max(1, per_vm - args.prune_points // args.vms))]
    steps: dict[str, Run] = {}

    def step(name: str, *words: str) -> Run:
        say(f"{server.kind}: {LABELS[name]}")
        steps[name] = run([*vmkeep, *words], env)
        return steps[name]

    listed = step("list_cold", "list", *at, "--json")
    step("list_warm", "list", *at, "--json")
    dry = step("prune_dry_run", "prune", *at, *keep, "--dry-run", "--json")
    backup = step("backup", "backup", str(vm_dir), *at, "--mode", "full", "--json")
    pruned = step("prune", "prune", *at, *keep, "--json")
    step("gc_dry_run", "gc", *at, "--dry-run", "--json")
    point = _json(backup).get("restore_point", "missing")
    if args.index_chunks <= 4:  # else most chunks the points reference are not stored
        step("verify", "verify", str(point), *at, "--json")
    return {
        "status": "ok",
        "description": server.description,
        "build_seconds": round(build, 1),
        "points_listed": len(_json(listed).get("restore_points", [])),
        "would_remove": len(_json(dry).get("removed", [])),
        "removed": len(_json(pruned).get("removed", [])),
        "backup": {k: _json(backup).get(k) for k in ("bytes_read", "chunks_new", "duration")},
        "steps": {name: _step_json(r) for name, r in steps.items()},
        "ok": all(r.returncode == 0 for r in steps.values()),
    }


def _json(r: Run) -> dict[str, Any]:
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _step_json(r: Run) -> dict[str, Any]:
    out: dict[str, Any] = {
        "seconds": round(r.seconds, 3),
        "cpu": round(r.cpu_seconds, 3),
        "peak_rss_mib": round(r.rss_mib),
    }
    if r.returncode:
        out["error"] = r.stderr.strip().splitlines()[-1:] or [f"exit {r.returncode}"]
    return out


def benchmark(work: Path, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "points": args.points,
        "vms": args.vms,
        "prune_points": args.prune_points,
        "index_chunks": args.index_chunks,
        "src": str(args.src),
        "remotes": {},
    }
    for kind in args.remotes:
        try:
            server = STARTERS[kind](work)
        except Unavailable as exc:
            result["remotes"][kind] = {"status": "unavailable", "reason": str(exc), "ok": True}
            continue
        try:
            result["remotes"][kind] = measure_remote(server, work, args, say)
        finally:
            server.stop()
    result["ok"] = all(r["ok"] for r in result["remotes"].values())
    return result


def print_report(result: dict[str, Any]) -> None:
    print(
        f"\n{result['points']} restore points of {result['vms']} VMs (vmkeep from {result['src']})"
    )
    for kind, r in result["remotes"].items():
        if r["status"] != "ok":
            print(f"\n{kind}: {r['status']} ({r.get('reason', '')})")
            continue
        print(f"\n{kind}: {r['description']}; built in {r['build_seconds']} s")
        print(f"  {'command':<26}{'seconds':>9}{'cpu s':>8}{'peak RSS MiB':>14}")
        for name in STEPS:
            s = r["steps"].get(name)
            if s is None:
                continue
            line = f"  {LABELS[name]:<26}{s['seconds']:>9.2f}{s['cpu']:>8.2f}"
            print(
                f"{line}{s['peak_rss_mib']:>14}"
                + (f"  FAILED: {s['error'][0]}" if "error" in s else "")
            )
        print(f"  listed {r['points_listed']}, prune removed {r['removed']}")
    print("OK" if result["ok"] else "FAIL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vmkeep's commands on a repository of N points.")
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--prune-points", type=int, default=250, help="points the prune drops")
    parser.add_argument(
        "--index-chunks",
        type=int,
        default=4,
        help="chunk IDs per point's disk (default 4; 25600 = a 100 GiB disk: gc's memory)",
    )
    parser.add_argument("--remotes", default=",".join(KINDS), help="local,s3")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="vmkeep sources to run")
    parser.add_argument("--workdir", type=Path, default=HERE / "work-scale")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    args.remotes = [k for k in args.remotes.split(",") if k]
    if any(k not in KINDS for k in args.remotes):
        parser.error(f"--remotes: choose among {', '.join(KINDS)}")
    if args.index_chunks < 1:
        parser.error("--index-chunks must be at least 1")
    if args.vms < 1 or args.points < args.vms:
        parser.error("--points must be at least --vms, which must be at least 1")
    say = speaker(args.json)
    work = args.workdir.resolve()
    prepare_workdir(work)
    with stopped_on_sigterm():
        return run_in_workdir(work, args, partial(benchmark, work, args, say), print_report, say)


if __name__ == "__main__":
    sys.exit(main())
