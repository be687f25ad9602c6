"""Core benchmark: vmkeep against restic and borg, on the same sparse image, in one run.

    .venv/bin/python bench/core.py [--size-gib 4] [--workdir bench/work] [--json] [--keep]

Order: build the image; `cat` it; first backup with every tool; a 1% scattered change; second
backup with every tool; restore with every tool; compare the restored image's sha256 with the
changed image. Each step is one subprocess timed with os.wait4 (wall seconds, CPU seconds, peak
RSS), with the page cache dropped before it when the kernel lets us.

A vforked child's ru_maxrss starts from this process's peak RSS, so the heavy lifting (building,
changing and hashing the image) runs in forked helpers and this process stays small: the
`cat` row shows the remaining floor (~20 MiB), below what any of the measured tools needs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import io_floor
from image import GiB, MiB, allocated_bytes, apply_change, build_image, plan_change, sha256_file
from image import touched_chunks as count_touched
from io_floor import drop_caches

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
MARKER = ".vmkeep-bench"  # only a workdir holding this file is ever deleted
PASSPHRASE = "bench-passphrase-not-secret"
CHANGE_FRACTION = 0.01
STEPS = ("init", "first", "second", "restore")
LABELS = {
    "read": "read (cat)",
    "init": "init",
    "first": "backup 1 (full)",
    "second": "backup 2 (1% changed)",
    "restore": "restore",
}
# Other repository formats of vmkeep, run side by side with `--variants` (docs/DATA-PATH.md,
# "Format 3"): the same commands, only the init differs.
VARIANTS = {
    "v1": "--format 1",  # format 1: one object per 4 MiB chunk (init's default is format 3)
    "v2-256k": "--chunk-size 256K",  # format 2: one object per 256 KiB chunk
    "v3": "--format 3",  # format 3 as init makes it: 64 KiB blocks (128 KiB before)
    "v3-64k": "--format 3 --block-size 64K",  # the same with 64 KiB blocks
}
# Split on spaces first, then each word is formatted: paths may contain spaces.
COMMANDS = {
    "vmkeep": {
        "init": "{vmkeep} init {repo}",
        "first": "{vmkeep} backup {vm} --remote {repo} --mode full --json",
        "second": "{vmkeep} backup {vm} --remote {repo} --mode delta --json",
        "restore": "{vmkeep} restore {point} --remote {repo} --to {restore} --json",
    },
    "restic": {
        "init": "restic -r {repo} init",
        "first": "restic -r {repo} backup {image}",
        "second": "restic -r {repo} backup {image}",
        # restic 0.14 has no restore --sparse: it writes the holes out as zeros.
        "restore": "restic -r {repo} restore latest --target {restore}",
    },
    "borg": {
        "init": "borg init -e repokey {repo}",
        "first": "borg create --compression zstd,3 {repo}::first {image}",
        "second": "borg create --compression zstd,3 {repo}::second {image}",
        # Runs inside {restore}; --sparse leaves holes for zero runs, as vmkeep does.
        "restore": "borg extract --sparse {repo}::second",
    },
}


for _variant, _init in VARIANTS.items():
    COMMANDS[f"vmkeep-{_variant}"] = dict(
        COMMANDS["vmkeep"], init=COMMANDS["vmkeep"]["init"] + " " + _init
    )


@dataclass
class Run:
    seconds: float
    cpu_seconds: float
    rss_mib: float
    returncode: int
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)

    def summary(self, size: int | None) -> dict[str, Any]:
        """Times and peak RSS; MB/s is `size` (the image's logical size) per second."""
        mb_per_s = size / 1e6 / self.seconds if size and self.seconds else None
        return {
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "mb_per_s": None if mb_per_s is None else round(mb_per_s, 1),
            "peak_rss_mib": round(self.rss_mib, 1),
        }


def run(argv: list[str], env: dict[str, str], cwd: Path | None = None, capture: bool = True) -> Run:
    """One subprocess; wall time, CPU time and peak RSS come from os.wait4."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdout = out if capture else subprocess.DEVNULL
        began = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=err, env=env, cwd=cwd
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    cpu = usage.ru_utime + usage.ru_stime
    return Run(seconds, cpu, usage.ru_maxrss / 1024, proc.returncode, *text)


def in_helper(fn: Callable[..., T], *args: Any) -> T:
    """Run fn in a forked helper process, so its memory never raises this process's peak RSS."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(fn, *args).result()


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no output)"


def dir_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def ensure_peers(install: bool, say: Callable[[str], None]) -> dict[str, str | None]:
    """restic and borg from Debian; returns tool -> why it is unavailable (None: it is there)."""
    packages = {"restic": "restic", "borg": "borgbackup"}
    missing = [pkg for cmd, pkg in packages.items() if not shutil.which(cmd)]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        say(f"installing {' '.join(missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            done = subprocess.run(argv, env=env, capture_output=True, text=True)
            if done.returncode:
                say(f"{' '.join(argv)} failed: {last_line(done.stderr)}")
                break
    reasons: dict[str, str | None] = {}
    for cmd, pkg in packages.items():
        if shutil.which(cmd):
            reasons[cmd] = None
        elif not install:
            reasons[cmd] = f"not installed (--no-install given; apt-get install {pkg})"
        elif os.geteuid() != 0:
            reasons[cmd] = f"not installed, and not root to install it (apt-get install {pkg})"
        else:
            reasons[cmd] = f"still missing after apt-get install {pkg}"
    return reasons


@dataclass
class Tool:
    name: str
    env: dict[str, str]
    words: dict[str, str]  # values for the {placeholders} of COMMANDS
    reason: str | None = None  # why it was skipped or failed
    runs: dict[str, Run] = field(default_factory=dict)
    repo_bytes: dict[str, int] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)  # vmkeep's own --json output
    restore_sha256: str | None = None

    @property
    def restore_dir(self) -> Path:
        return Path(self.words["restore"])

    def argv(self, step: str) -> list[str]:
        return [word.format(**self.words) for word in COMMANDS[self.name][step].split()]

    def restored_image(self, image_name: str) -> Path:
        if self.name.startswith("vmkeep"):  # a new VM dir: <to>/<name>/vm.json names the disk
            config = json.loads((self.restore_dir / "bench" / "vm.json").read_text())
            return self.restore_dir / "bench" / str(config["disks"][0]["file"])
        found = [p for p in self.restore_dir.rglob(image_name) if p.is_file()]
        if len(found) != 1:
            raise FileNotFoundError(f"{len(found)} files named {image_name} in {self.restore_dir}")
        return found[0]


def make_tools(
    work: Path, vm_dir: Path, image: Path, variants: tuple[str, ...] = ()
) -> dict[str, Tool]:
    vmkeep = Path(sys.executable).with_name("vmkeep")
    envs = {
        "vmkeep": {"VMKEEP_PASSPHRASE": PASSPHRASE, "VMKEEP_CONFIG_DIR": f"{work}/config-vmkeep"},
        **{
            f"vmkeep-{v}": {
                "VMKEEP_PASSPHRASE": PASSPHRASE,
                "VMKEEP_CONFIG_DIR": f"{work}/config-vmkeep-{v}",
                "VMKEEP_CACHE_DIR": f"{work}/cache-vmkeep-{v}",
            }
            for v in variants
        },
        "restic": {"RESTIC_PASSWORD": PASSPHRASE, "RESTIC_CACHE_DIR": f"{work}/cache-restic"},
        "borg": {"BORG_PASSPHRASE": PASSPHRASE, "BORG_BASE_DIR": f"{work}/base-borg"},
    }
    tools = {}
    for name, env in envs.items():
        words = {
            "vmkeep": str(vmkeep) if vmkeep.exists() else "vmkeep",
            "repo": f"{work}/repo-{name}",
            "restore": f"{work}/restore-{name}",
            "vm": str(vm_dir),
            "image": str(image),
        }
        tools[name] = Tool(name, dict(os.environ, **env), words)
    return tools


def vmkeep_reason(tool: Tool) -> str | None:
    """Why vmkeep cannot run at all, or None."""
    try:
        done = subprocess.run([tool.words["vmkeep"], "--help"], capture_output=True, text=True)
    except OSError as exc:
        return f"cannot run {tool.words['vmkeep']}: {exc.strerror}"
    return (
        f"`vmkeep --help` exits {done.returncode}: {last_line(done.stderr)}"
        if done.returncode
        else None
    )


def step(tool: Tool, name: str, say: Callable[[str], None]) -> None:
    """Run one step of a tool, unless an earlier one failed; a failure skips the rest."""
    if tool.reason:
        return
    cwd = None
    if name == "restore":
        tool.restore_dir.mkdir(parents=True, exist_ok=True)
        cwd = tool.restore_dir if tool.name == "borg" else None
        if tool.name.startswith("vmkeep"):
            tool.words["point"] = str(tool.reports["second"].get("restore_point"))
    drop_caches()
    result = tool.runs[name] = run(tool.argv(name), tool.env, cwd)
    if result.returncode:
        tool.reason = f"{name} failed (exit {result.returncode}): {last_line(result.stderr)}"
    elif tool.name.startswith("vmkeep") and name != "init":
        try:
            tool.reports[name] = json.loads(result.stdout)
        except ValueError:
            tool.reason = f"{name}: --json output is not JSON: {result.stdout[:200]!r}"
    if tool.reason:
        say(f"{tool.name}: {tool.reason}")
        return
    if name in ("first", "second"):
        tool.repo_bytes[name] = dir_bytes(Path(tool.words["repo"]))
    say(f"{tool.name} {name}: {result.seconds:.2f} s, peak RSS {result.rss_mib:.0f} MiB")


def disk_floors(vmkeep: Tool, image: Path, work: Path) -> dict[str, dict[str, Any]]:
    """bench/io_floor.py under vmkeep's full backup (read the image's data, write what the
    full stored; the image as changed: the same extents) and its restore (read a full's
    worth of the repository, write the restored image's data). Measured after every tool
    has run."""
    restored = vmkeep.restored_image(image.name)
    repo = Path(vmkeep.words["repo"])
    full = vmkeep.repo_bytes["first"]
    return {
        "first": in_helper(io_floor.least, [image], full, work),
        "restore": in_helper(  # the latest point's data: about what the full stored
            io_floor.least, [repo], allocated_bytes(str(restored)), work, full
        ),
    }


def ratios(
    tools: dict[str, Tool], floors: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """vmkeep against each peer; some rows carry a target and a PASS/MISS verdict. `floors`:
    the disk's time under vmkeep's steps (disk_floors), for how far each is from the disk
    and the most a ratio against restic could be on this machine."""

    def seconds(tool: str, name: str) -> float | None:
        t = tools[tool]
        return None if t.reason or name not in t.runs else t.runs[name].seconds

    def speedup(peer: str, peer_step: str, vmkeep_step: str, mine: str = "vmkeep") -> float | None:
        num, den = seconds(peer, peer_step), seconds(mine, vmkeep_step)
        return num / den if num is not None and den else None

    def repo_ratio(peer: str, after: str) -> float | None:
        mine, theirs = (tools[t].repo_bytes.get(after) for t in ("vmkeep", peer))
        ok = not tools["vmkeep"].reason and not tools[peer].reason
        return mine / theirs if ok and mine is not None and theirs else None

    rows: list[dict[str, Any]] = []

    def add(label: str, value: float | None, target: str = "", ok: bool | None = None) -> None:
        verdict = "" if not target else "n/a" if value is None else "PASS" if ok else "MISS"
        value = None if value is None else round(value, 3)
        rows.append({"ratio": label, "value": value, "target": target, "verdict": verdict})

    for peer in ("restic", "borg"):
        targeted = peer == "restic"  # the targets are set against restic

        def target(text: str, targeted: bool = targeted) -> str:
            return text if targeted else ""

        full, delta = speedup(peer, "first", "first"), speedup(peer, "second", "second")
        restore, repo = speedup(peer, "restore", "restore"), repo_ratio(peer, "second")
        repo_full = repo_ratio(peer, "first")
        add(f"full backup speedup vs {peer} 1st", full, target(">= 3x"), (full or 0) >= 3)
        add(f"delta backup speedup vs {peer} 2nd", delta)
        add(f"restore speedup vs {peer}", restore, target(">= 2x"), (restore or 0) >= 2)
        add(
            f"repo size vmkeep / {peer}, after full",
            repo_full,
            target("<= 1"),
            repo_full is not None and repo_full <= 1,
        )
        add(
            f"repo size vmkeep / {peer}, after delta",
            repo,
            target("<= 1"),
            repo is not None and repo <= 1,
        )
    for variant in [t for t in tools if t.startswith("vmkeep-")]:
        for label, step_name in (("full", "first"), ("delta", "second"), ("restore", "restore")):
            value = speedup("restic", step_name, step_name, variant)
            add(f"{variant} {label} speedup vs restic", value)
        growth = [
            tools[t].repo_bytes.get("second", 0) - tools[t].repo_bytes.get("first", 0)
            for t in (variant, "restic")
        ]
        ok = not tools[variant].reason and not tools["restic"].reason and growth[1] > 0
        add(f"{variant} delta stored / restic's", growth[0] / growth[1] if ok else None)
    for name, label in (("first", "full backup"), ("restore", "restore")):
        under = (floors or {}).get(name, {}).get("seconds")
        mine, theirs = seconds("vmkeep", name), seconds("restic", name)
        add(f"vmkeep {label} / its disk floor", mine / under if mine and under else None)
        best = theirs / under if theirs and under else None
        add(f"{label} speedup vs restic the disk allows at most", best)
    vk = tools["vmkeep"]
    rss = None if vk.reason or not vk.runs else max(r.rss_mib for r in vk.runs.values())
    add("vmkeep peak RSS (MiB)", rss, "< 300", rss is not None and rss < 300)
    return rows


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    img = result["image"]
    title = f"{img['size'] / GiB:g} GiB sparse image, {img['allocated'] / GiB:.2f} GiB allocated"
    table = Table(title=f"vmkeep core benchmark: {title}")
    for col in ("step", "tool", "seconds", "MB/s (image)", "repo MiB", "peak RSS MiB", "CPU s"):
        table.add_column(col, justify="left" if col in ("step", "tool") else "right", no_wrap=True)
    for row in result["rows"]:
        repo = row["repo_bytes"]
        table.add_row(
            LABELS[row["step"]],
            row["tool"],
            fmt(row["seconds"]),
            fmt(row["mb_per_s"], 0) if row["mb_per_s"] else "",
            "" if repo is None else f"{repo / MiB:.0f}",
            fmt(row["peak_rss_mib"], 0),
            fmt(row["cpu_seconds"], 1),
        )
    console.print(table)

    colours = {"PASS": "green", "MISS": "red", "n/a": "yellow", "": "default"}
    table = Table(title="vmkeep vs peers (speedup = peer seconds / vmkeep seconds)")
    for col in ("ratio", "value", "target", "verdict"):
        table.add_column(col, justify="left" if col == "ratio" else "right")
    for r in result["ratios"]:
        verdict = f"[{colours[r['verdict']]}]{r['verdict']}[/]"
        table.add_row(r["ratio"], fmt(r["value"]), r["target"], verdict)
    console.print(table)

    for name, f in result["disk_floor"].items():
        console.print(
            f"disk floor under vmkeep's {LABELS[name]}: {f['read_bytes'] / MiB:.0f} MiB read and "
            f"{f['write_bytes'] / MiB:.0f} MiB written (O_DIRECT, fsync) together in "
            f"{f['seconds']:.2f} s"
        )
    for name, t in result["tools"].items():
        if t["reason"]:
            console.print(f"[yellow]{name} {t['status']}: {t['reason']}[/]")
        elif t["restore_ok"] is not None:
            verdict = "[green]OK[/]" if t["restore_ok"] else "[red]FAIL[/]"
            console.print(f"{name}: restored image sha256 = changed image sha256: {verdict}")
    mine = [(n, t) for n, t in result["tools"].items() if n.startswith("vmkeep")]
    for name, rep in [(n, r) for n, t in mine for r in t["reports"].values()]:
        if "bytes_read" in rep:
            console.print(
                f"{name} {rep['mode']}: read {rep['bytes_read'] / MiB:.0f} MiB, new "
                f"{rep['bytes_new'] / MiB:.0f} MiB, wrote {rep['bytes_written'] / MiB:.0f} MiB, "
                f"compression {rep['compression_ratio']}x, dedup {rep['dedup_ratio']}x"
            )
    change = result["change"]
    console.print(
        f"change: {change['blocks']} blocks of 64 KiB ({change['bytes'] / MiB:.1f} MiB) touch "
        f"{change['touched_4mib_chunks']} aligned 4 MiB chunks"
    )
    for note in result["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    console.print("[bold green]OK[/]" if result["ok"] else "[bold red]FAIL[/]")


def prepare_workdir(work: Path) -> None:
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        raise SystemExit(f"{work} is not empty and not a benchmark workdir: pick another --workdir")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARKER).write_text("vmkeep benchmark workdir: deleted at the end unless --keep\n")


def write_vm(vm_dir: Path) -> Path:
    vm_dir.mkdir(parents=True)
    config = {
        "name": "bench",
        "uuid": str(uuid.uuid4()),
        "vcpus": 2,
        "memory_mib": 2048,
        "disks": [{"name": "disk0", "file": "disk0.img", "format": "raw"}],
        "metadata": {},
    }
    (vm_dir / "vm.json").write_text(json.dumps(config, indent=2) + "\n")
    return vm_dir / "disk0.img"


def benchmark(
    work: Path,
    size: int,
    seed: int,
    install: bool,
    say: Callable[[str], None],
    variants: tuple[str, ...] = (),
) -> dict[str, Any]:
    notes: list[str] = []
    peers = ensure_peers(install, say)
    image = write_vm(work / "vms" / "bench")
    say(f"building a {size / GiB:g} GiB sparse image: {image}")
    layout = in_helper(build_image, str(image), size, seed)
    on_disk = allocated_bytes(str(image))
    if abs(on_disk - size / 2) > size * 0.05:
        notes.append(f"the image is not sparse as planned: {on_disk} of {size} bytes allocated")
    sha_original = in_helper(sha256_file, str(image))
    change = plan_change(layout, CHANGE_FRACTION, seed)
    if why := drop_caches():
        notes.append(why)
        say(why)

    tools = make_tools(work, image.parent, image, variants)
    tools["vmkeep"].reason = vmkeep_reason(tools["vmkeep"])
    for v in variants:
        tools[f"vmkeep-{v}"].reason = tools["vmkeep"].reason
    for peer in ("restic", "borg"):
        tools[peer].reason = peers[peer]
    for t in tools.values():
        if t.reason:
            say(f"skipping {t.name}: {t.reason}")

    cat = run(["cat", str(image)], dict(os.environ), capture=False)
    say(f"cat: {cat.seconds:.2f} s")
    notes.append(
        f"peak RSS has a floor of {cat.rss_mib:.0f} MiB, this script's own peak inherited through "
        "vfork (cat itself needs ~2 MiB): values at that floor may be smaller in truth"
    )
    for name in ("init", "first"):
        for t in tools.values():
            step(t, name, say)
    in_helper(apply_change, str(image), change)
    sha_changed = in_helper(sha256_file, str(image))
    for name in ("second", "restore"):
        for t in tools.values():
            step(t, name, say)
    for t in tools.values():
        if not t.reason:
            try:
                t.restore_sha256 = in_helper(sha256_file, str(t.restored_image(image.name)))
            except (OSError, ValueError, KeyError, IndexError) as exc:
                t.reason = f"cannot find the restored image: {exc}"

    floors: dict[str, dict[str, Any]] = {}
    if not tools["vmkeep"].reason:
        say("measuring the disk's floor under vmkeep's full backup and restore (io_floor.py)")
        floors = disk_floors(tools["vmkeep"], image, work)

    rows = [{"step": "read", "tool": "cat", **cat.summary(size), "repo_bytes": None}]
    for name in STEPS:
        for t in tools.values():
            if name in t.runs and t.runs[name].returncode == 0:
                summary = t.runs[name].summary(None if name == "init" else size)
                rows.append(
                    {"step": name, "tool": t.name, **summary, "repo_bytes": t.repo_bytes.get(name)}
                )
    tool_json = {
        t.name: {
            "status": "ok" if not t.reason else "failed" if t.runs else "skipped",
            "reason": t.reason,
            "restore_ok": None if t.restore_sha256 is None else t.restore_sha256 == sha_changed,
            "restore_sha256": t.restore_sha256,
            "repo_bytes": t.repo_bytes,
            "steps": {
                k: r.summary(None if k == "init" else size)
                for k, r in t.runs.items()
                if r.returncode == 0
            },
            "reports": t.reports,
        }
        for t in tools.values()
    }
    # FAIL: a restore that does not match, a tool that broke midway, or vmkeep not running.
    ok = tools["vmkeep"].reason is None and all(
        t["restore_ok"] is not False and t["status"] != "failed" for t in tool_json.values()
    )
    return {
        "image": {
            "size": size,
            "allocated": layout.allocated,
            "allocated_on_disk": on_disk,
            "regions": len(layout.regions),
            "compressible": sum(r.length for r in layout.regions if r.compressible),
            "sha256_original": sha_original,
            "sha256_changed": sha_changed,
            "seed": seed,
        },
        "change": {
            "blocks": len(change),
            "bytes": len(change) * 64 * 1024,
            "touched_4mib_chunks": count_touched(change, 4 * MiB),
        },
        "page_cache_dropped": why is None,
        "rows": rows,
        "tools": tool_json,
        "disk_floor": floors,
        "ratios": ratios(tools, floors),
        "notes": notes,
        "ok": ok,
    }


def speaker(as_json: bool) -> Callable[[str], None]:
    """Progress lines go to stderr under --json, so stdout stays one JSON document."""

    def say(message: str) -> None:
        print(message, file=sys.stderr if as_json else sys.stdout, flush=True)

    return say


def run_in_workdir(
    work: Path,
    args: argparse.Namespace,
    measure: Callable[[], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
    say: Callable[[str], None],
) -> int:
    """The tail every bench shares: measure, always remove the workdir (unless --keep), print
    the result as JSON or as the bench's table; exit 1 when a check in it failed. Every
    step's temporary files go to the workdir's `tmp/` (TMPDIR): peers leave theirs behind
    (virtnbdrestore's qemu-img and qemu-nbd logs, one pair per restore), the workdir goes."""
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # tempfile caches the directory it chose first
    try:
        result = measure()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        say(f"benchmark failed: {exc}")
        return 1
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vmkeep vs restic and borg on one sparse image.")
    parser.add_argument("--size-gib", type=float, default=4.0, help="image size (default 4)")
    parser.add_argument("--workdir", type=Path, default=HERE / "work")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--seed", type=int, default=1, help="layout seed (default 1)")
    parser.add_argument("--no-install", action="store_true", help="never apt-get restic/borg")
    parser.add_argument(
        "--variants",
        default="",
        help=f"other vmkeep repository formats side by side, comma-separated: {','.join(VARIANTS)}",
    )
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown --variants {unknown}: choose from {', '.join(VARIANTS)}")
    size = int(args.size_gib * GiB) // MiB * MiB
    if size < 16 * MiB:
        parser.error("--size-gib must be at least 1/64 (16 MiB)")
    say = speaker(args.json)
    work = args.workdir.resolve()
    prepare_workdir(work)
    measure = partial(benchmark, work, size, args.seed, not args.no_install, say, variants)
    return run_in_workdir(work, args, measure, print_report, say)


if __name__ == "__main__":
    sys.exit(main())
