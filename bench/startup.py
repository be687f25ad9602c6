"""Start-up benchmark: how long a user waits for `vmkeep --help` and a local `vmkeep list`,
next to restic's and borg's shortest commands (issue 15, deliverable 4).

    .venv/bin/python bench/startup.py [--runs 10] [--json] [--workdir DIR] [--keep]

Each command runs --runs times as a subprocess (wall time of the whole process, interpreter
start-up included); min and median are printed. The minimum is the figure to compare: this
machine is shared, so the other runs measure the neighbours as much as vmkeep.
`list` reads a small unencrypted local repository made here (one demo VM, one backup).
Targets: `--help` < 150 ms, `list` < 400 ms. Peers (`restic version`, `borg --version`) are
what a user of those tools waits for to see anything at all: the ratio is vmkeep --help / peer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VMKEEP = [sys.executable, "-m", "vmkeep.interfaces.cli.app"]
TARGETS_MS = {"vmkeep --help": 150.0, "vmkeep list": 400.0}


def vmkeep_command() -> list[str]:
    """The installed `vmkeep` script next to this interpreter (what users run), else `-m`."""
    script = Path(sys.executable).with_name("vmkeep")
    return [str(script)] if script.exists() else VMKEEP


def time_runs(argv: list[str], runs: int, env: dict[str, str]) -> list[float]:
    """Wall seconds of each run; a failing command stops the benchmark (a broken CLI is fast)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            sys.exit(f"error: {' '.join(argv)} failed: {done.stderr.decode().strip()}")
    return times


def make_repo(workdir: Path, env: dict[str, str]) -> Path:
    """A small unencrypted repository with one restore point of a 32 MiB demo VM."""
    vmkeep = vmkeep_command()
    repo = workdir / "repo"
    steps = [
        ["init", "--encryption", "none", str(repo)],
        ["vm", "create-demo", "--size", "32", str(workdir / "vms")],
        ["backup", "--remote", str(repo), str(workdir / "vms" / "demo")],
    ]
    for step in steps:
        subprocess.run([*vmkeep, *step], env=env, check=True, capture_output=True)
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmkeep-startup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VMKEEP_DATA_DIR": str(workdir / "state"), "COLUMNS": "120"}
    try:
        repo = make_repo(workdir, env)
        commands: dict[str, list[str]] = {
            "vmkeep --help": [*vmkeep_command(), "--help"],
            "vmkeep list": [*vmkeep_command(), "list", "--remote", str(repo)],
        }
        for name, argv in (
            ("restic version", ["restic", "version"]),
            ("borg --version", ["borg", "--version"]),
        ):
            if shutil.which(argv[0]):
                commands[name] = argv
        results = {name: time_runs(argv, args.runs, env) for name, argv in commands.items()}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, args.json)


def report(results: dict[str, list[float]], as_json: bool) -> None:
    """Min/median per command in ms, the target verdicts, and vmkeep / peer ratios of the minima."""
    rows = {
        name: {"min_ms": min(t) * 1000, "median_ms": statistics.median(t) * 1000}
        for name, t in results.items()
    }
    help_min = rows["vmkeep --help"]["min_ms"]
    for name, row in rows.items():
        if name in TARGETS_MS:
            row["target_ms"] = TARGETS_MS[name]
            row["ok"] = row["min_ms"] < TARGETS_MS[name]
        else:
            row["ratio_vmkeep_help_over_peer"] = help_min / row["min_ms"]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'command':<16} {'min ms':>8} {'median ms':>10}  verdict")
    for name, row in rows.items():
        if "target_ms" in row:
            verdict = f"{'OK' if row['ok'] else 'SLOW'} (target < {row['target_ms']:.0f} ms)"
        else:
            verdict = f"peer: vmkeep --help takes {row['ratio_vmkeep_help_over_peer']:.2f}x"
        print(f"{name:<16} {row['min_ms']:8.1f} {row['median_ms']:10.1f}  {verdict}")


if __name__ == "__main__":
    main()
