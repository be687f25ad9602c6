"""The timed steps and the report of bench/libvirt_live.py: seconds, CPU, bytes read and
stored per tool and step, and the ratios of issue 15's targets (vmkeep vs virtnbdbackup,
virtnbdbackup -z and restic)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import Run, dir_bytes, drop_caches, last_line, run
from image import GiB, MiB

# (name, slower tool's step, vmkeep's step, target): vmkeep at least `target` times faster.
# The targets are issue 15's, no others: full >= 1.0x virtnbdbackup, 1.5x -z, 4x restic;
# scattered delta >= 1.0x virtnbdbackup (and stored <= 1.5x -z's: STORED_TARGET); clustered
# and no-change deltas >= 1.5x virtnbdbackup; restore >= 1.5x virtnbdrestore, 2.5x restic.
# Ratios without a target (None) are shown for information.
SPEEDUPS = [
    ("full vs virtnbdbackup", "virtnbdbackup full", "full", 1.0),
    ("full vs virtnbdbackup -z", "virtnbdbackup -z full", "full", 1.5),
    ("full vs restic", "restic full", "full", 4.0),
    ("scattered delta vs virtnbdbackup", "virtnbdbackup scattered", "scattered", 1.0),
    ("scattered delta vs restic", "restic scattered", "scattered", None),
    ("clustered delta vs virtnbdbackup", "virtnbdbackup clustered", "clustered", 1.5),
    ("clustered delta vs restic", "restic clustered", "clustered", None),
    ("no-change delta vs virtnbdbackup", "virtnbdbackup no-change", "no-change", 1.5),
    ("restore vs virtnbdrestore", "virtnbdbackup restore", "restore", 1.5),
    ("restore vs restic", "restic restore", "restore", 2.5),
    ("restore vs restic + fsync", "restic restore + fsync", "restore", None),
]
STORED_TARGET = 1.5  # scattered delta: vmkeep stores at most 1.5x what virtnbdbackup -z does
TOOLS = ("virtnbdbackup", "virtnbdbackup -z", "restic")


class Steps:
    """The timed subprocesses of one run by label, with what each added to its store."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.runs: dict[str, Run] = {}
        self.outputs: dict[str, Any] = {}
        self.stored: dict[str, int] = {}
        self.floors: dict[str, dict[str, Any]] = {}  # vmkeep's restores' (bench/io_floor.py)
        self._sizes: dict[Path, int] = {}

    def __call__(
        self, label: str, argv: list[str], env: dict[str, str], store: Path | None = None
    ) -> Run:
        drop_caches()
        result = self.runs[label] = run(argv, env)
        if result.returncode:
            raise RuntimeError(f"{label} failed (exit {result.returncode}): "
                               f"{last_line(result.stderr)}")  # fmt: skip
        if argv[1:2] in (["backup"], ["restore"]) and "--json" in argv:
            self.outputs[label] = json.loads(result.stdout)
        if store is not None:
            size = dir_bytes(store)
            self.stored[label] = size - self._sizes.get(store, 0)
            self._sizes[store] = size
        self.say(f"{label}: {result.seconds:.2f} s, peak RSS {result.rss_mib:.0f} MiB")
        return result


def touched_chunks(change: list[int], block: int, chunk: int) -> int:
    return len({i for o in change for i in range(o // chunk, (o + block - 1) // chunk + 1)})


def ratios(steps: Steps, label: str) -> list[dict[str, Any]]:
    t = {k: r.seconds for k, r in steps.runs.items()}
    out = []
    for name, peer, step, target in SPEEDUPS:
        value = t[peer] / t[f"vmkeep {label} {step}"]
        met = None if target is None else value >= target
        out.append({"name": name, "value": round(value, 2), "target": target, "met": met})
    under = steps.floors.get(label, {}).get("seconds")
    if under:  # how far the restore is from the disk, and the most any tool could be faster
        mine = t[f"vmkeep {label} restore"]
        out.append({"name": "restore / its disk floor", "value": round(mine / under, 2),
                    "target": None, "met": None})  # fmt: skip
        best = t["restic restore"] / under
        out.append({"name": "restore vs restic the disk allows at most",
                    "value": round(best, 2), "target": None, "met": None})  # fmt: skip
    stored = steps.stored[f"vmkeep {label} scattered"] / steps.stored["virtnbdbackup -z scattered"]
    out.append({"name": "scattered delta stored vs virtnbdbackup -z (lower is better)",
                "value": round(stored, 2), "target": STORED_TARGET,
                "met": stored <= STORED_TARGET})  # fmt: skip
    return out


def report(
    steps: Steps,
    chunk_sizes: dict[str, int],
    size: int,
    allocated: int,
    change: dict[str, tuple[list[int], int]],
    write_seconds: dict[str, float],
) -> dict[str, Any]:
    per_size: dict[str, Any] = {}
    scattered, block = change["scattered"]
    for label, chunk in chunk_sizes.items():
        out = {p: steps.outputs[f"vmkeep {label} {p}"] for p in ("full", "scattered")}
        per_size[label] = {
            "chunk_size": chunk,
            "touched_chunks": touched_chunks(scattered, block, chunk),
            "full_bytes_read": out["full"]["bytes_read"],
            "full_bytes_chunks": out["full"]["bytes_chunks"],
            "delta_bytes_read": out["scattered"]["bytes_read"],
            "delta_bytes_chunks": out["scattered"]["bytes_chunks"],
            "delta_notes": out["scattered"]["notes"],
            "ratios": ratios(steps, label),
        }
    return {
        "image": {"size": size, "allocated": allocated, "format": "qcow2 (compat 1.1)"},
        "change": {
            name: {
                "blocks": len(offsets),
                "block_bytes": n,
                "bytes": len(offsets) * n,
                "guest_write_seconds": round(write_seconds[name], 2),
            }
            for name, (offsets, n) in change.items()
        },
        "steps": {k: r.summary(size) for k, r in steps.runs.items()},
        "stored": steps.stored,
        "vmkeep": per_size,
    }


def _cell(result: dict[str, Any], label: str, what: str) -> str:
    step = result["steps"].get(label)
    if step is None:
        return ""
    if what == "stored":
        return f"{result['stored'][label] / MiB:.0f} MiB"
    if what == "cpu":
        return f"{step['cpu_seconds']:.1f} s CPU"
    return f"{step['seconds']:.2f} s"


def print_report(result: dict[str, Any]) -> None:
    c = result["change"]
    print(f"\nlibvirt benchmark: {result['image']['size'] / GiB:g} GiB qcow2 disk of a running "
          f"domain, {result['image']['allocated'] / GiB:.2f} GiB allocated "
          f"({result['image'].get('data', 0) / MiB:.0f} MiB of qcow2 data); scattered change: "
          f"{c['scattered']['blocks']} x {c['scattered']['block_bytes'] // 1024} KiB, clustered: "
          f"{c['clustered']['bytes'] / MiB:.0f} MiB, through the VMs")  # fmt: skip
    tools = [f"vmkeep {label}" for label in result["vmkeep"]] + list(TOOLS)
    rows = [
        ("full", "full", "time"),
        ("full CPU", "full", "cpu"),
        ("full stored", "full", "stored"),
        ("scattered delta", "scattered", "time"),
        ("scattered stored", "scattered", "stored"),
        ("clustered delta", "clustered", "time"),
        ("no-change delta", "no-change", "time"),
        ("restore latest", "restore", "time"),
        ("restore CPU", "restore", "cpu"),
        ("restore + fsync", "restore + fsync", "time"),
    ]
    print("| step | " + " | ".join(tools) + " |")
    print("|---" * (len(tools) + 1) + "|")
    for name, step, what in rows:
        cells = [_cell(result, f"{tool} {step}", what) for tool in tools]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for label, v in result["vmkeep"].items():
        print(f"vmkeep, {label} chunks: full read {v['full_bytes_read'] / MiB:.0f} MiB of "
              f"{v['full_bytes_chunks'] / MiB:.0f} MiB of chunks; scattered delta read "
              f"{v['delta_bytes_read'] / MiB:.0f} MiB of {v['delta_bytes_chunks'] / MiB:.0f} "
              f"MiB ({v['touched_chunks']} chunks touched)")  # fmt: skip
        for x in v["ratios"]:
            verdict = "" if x["met"] is None else ("PASS" if x["met"] else "MISS")
            target = "" if x["target"] is None else f"target {x['target']}x"
            print(f"  {x['name']}: {x['value']:.2f}x   {target} {verdict}")
    for tool, same in result["restore_ok"].items():
        print(f"restore of the latest point, {tool} == disk: {'OK' if same else 'MISMATCH'}")
