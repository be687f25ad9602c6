"""Start-up benchmark: how long a user waits for `vmkeep --help` and a local `vmkeep list`,
next to restic's and borg's shortest commands (issue 15, deliverable 4), and how long a small
`vmkeep backup` and `vmkeep restore` take to reach their first data step, warm and cold.

    .venv/bin/python bench/startup.py [--runs 10] [--json] [--workdir DIR] [--keep] [--no-cold]

Each command runs --runs times as a subprocess (wall time of the whole process, interpreter
start-up included); min and median are printed. The minimum is the figure to compare: this
machine is shared, so the other runs measure the neighbours as much as vmkeep.
`list` reads a small unencrypted local repository made here (one demo VM, one backup).
Targets: `--help` < 150 ms, `list` < 400 ms. Peers (`restic version`, `borg --version`) are
what a user of those tools waits for to see anything at all: the ratio is vmkeep --help / peer.

`backup` and `restore` use the files connector and an encrypted format 3 repository (the
default of `vmkeep init`), as bench/libvirt_live.py's restore does: a 32 MiB qcow2 demo VM,
backed up again each run (its data deduplicates: the process is almost all start-up), and
its first point restored into a new directory each run. Besides the whole process, "first
data" is the time from the spawn to the first data step in the command's timeline
(VMKEEP_TRACE: the backup's extents, the restore's first fetch of chunks). "cold"
runs drop the page cache before each run (root only), as the live benchmark does before each
timed step; the vmkeep package is byte-compiled first, as an installed package is.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core import PASSPHRASE, drop_caches

VMKEEP = [sys.executable, "-m", "vmkeep.interfaces.cli.app"]
TARGETS_MS = {"vmkeep --help": 150.0, "vmkeep list": 400.0}
FIRST_DATA = ("extents", "fetch+")  # the first data step: backup (extents walked), restore


@dataclass
class Command:
    """One measured command: its argv, what to do before each run (a fresh restore target),
    and whether its timeline (VMKEEP_TRACE) has a first data step to report."""

    argv: list[str]
    before: Callable[[], None] = lambda: None
    traced: bool = False
    cold: bool = False
    times: list[float] = field(default_factory=list)
    first_data: list[float] = field(default_factory=list)


def vmkeep_command() -> list[str]:
    """The installed `vmkeep` script next to this interpreter (what users run), else `-m`."""
    script = Path(sys.executable).with_name("vmkeep")
    return [str(script)] if script.exists() else VMKEEP


def time_run(command: Command, env: dict[str, str], trace: Path) -> None:
    """One run's wall seconds (and its first data step's); a failing command stops the
    benchmark (a broken CLI is fast)."""
    command.before()
    if command.cold and (reason := drop_caches()) is not None:
        sys.exit(f"error: {reason}")
    if command.traced:
        env = {**env, "VMKEEP_TRACE": str(trace)}
    start = time.time()
    done = subprocess.run(command.argv, env=env, capture_output=True)
    command.times.append(time.time() - start)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command.argv)} failed: {done.stderr.decode().strip()}")
    if command.traced:
        command.first_data.append(first_data_step(trace) - start)


def first_data_step(trace: Path) -> float:
    """The wall clock of the timeline's first data step (trace.py: `seconds thread event`)."""
    for line in trace.read_text().splitlines():
        at, _, event = line.split(" ", 2)
        if event in FIRST_DATA:
            return float(at)
    sys.exit(f"error: no first data step ({' or '.join(FIRST_DATA)}) in the timeline {trace}")


def make_repos(workdir: Path, env: dict[str, str]) -> tuple[Path, Path, str]:
    """A small unencrypted repository with one restore point of a 32 MiB demo VM (for
    `list`), an encrypted format 3 one with a point of a 32 MiB qcow2 demo VM (for backup and
    restore); returns both and the encrypted one's point."""
    vmkeep = vmkeep_command()
    repo, enc = workdir / "repo", workdir / "repo-enc"
    steps = [
        ["init", "--encryption", "none", str(repo)],
        ["vm", "create-demo", "--size", "32", str(workdir / "vms")],
        ["backup", "--remote", str(repo), str(workdir / "vms" / "demo")],
        ["init", str(enc)],
        ["vm", "create-demo", "--size", "32", "--format", "qcow2", str(workdir / "qvms")],
    ]
    for step in steps:
        subprocess.run([*vmkeep, *step], env=env, check=True, capture_output=True)
    argv = [*vmkeep, "backup", "--remote", str(enc), str(workdir / "qvms" / "demo"), "--json"]
    done = subprocess.run(argv, env=env, check=True, capture_output=True)
    return repo, enc, json.loads(done.stdout)["restore_point"]


def data_commands(workdir: Path, enc: Path, point: str, cold: bool) -> dict[str, Command]:
    """`backup` and `restore` of the encrypted repository, warm and (if asked) cold."""
    vmkeep = vmkeep_command()
    target = workdir / "restored"

    def fresh_target() -> None:
        shutil.rmtree(target, ignore_errors=True)

    backup = [*vmkeep, "backup", "--remote", str(enc), str(workdir / "qvms" / "demo"), "--json"]
    restore = [*vmkeep, "restore", point, "--remote", str(enc), "--to", str(target), "--json"]
    commands: dict[str, Command] = {}
    for mode in ("warm", "cold") if cold else ("warm",):
        is_cold = mode == "cold"
        commands[f"vmkeep backup ({mode})"] = Command(backup, traced=True, cold=is_cold)
        commands[f"vmkeep restore ({mode})"] = Command(
            restore, fresh_target, traced=True, cold=is_cold
        )
    return commands


def compile_package() -> None:
    """Byte-compile the vmkeep package the commands import, as an installed package is
    (PYTHONDONTWRITEBYTECODE is set on these machines: docs/RUN-OVERHEAD.md)."""
    import vmkeep

    compileall.compile_dir(Path(vmkeep.__file__).parent, quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    args = parser.parse_args()
    cold = not args.no_cold and drop_caches() is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmkeep-startup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "VMKEEP_DATA_DIR": str(workdir / "state"),
        "VMKEEP_PASSPHRASE": PASSPHRASE,
        "COLUMNS": "120",
    }
    try:
        compile_package()
        repo, enc, point = make_repos(workdir, env)
        commands: dict[str, Command] = {
            "vmkeep --help": Command([*vmkeep_command(), "--help"]),
            "vmkeep list": Command([*vmkeep_command(), "list", "--remote", str(repo)]),
            **data_commands(workdir, enc, point, cold),
        }
        for name, argv in (
            ("restic version", ["restic", "version"]),
            ("borg --version", ["borg", "--version"]),
        ):
            if shutil.which(argv[0]):
                commands[name] = Command(argv)
        # Round-robin, so the neighbours' load falls on every command; the warm commands
        # first, as a cold run leaves the next one cold too.
        for group in (False, True):
            for _ in range(args.runs):
                for command in (c for c in commands.values() if c.cold == group):
                    time_run(command, env, workdir / "trace")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(commands, args.json, cold)


def report(commands: dict[str, Command], as_json: bool, cold: bool) -> None:
    """Min/median per command in ms, the target verdicts, the first data step of backup and
    restore, and vmkeep / peer ratios of the minima."""
    rows: dict[str, dict[str, float | bool]] = {}
    for name, command in commands.items():
        row: dict[str, float | bool] = {
            "min_ms": min(command.times) * 1000,
            "median_ms": statistics.median(command.times) * 1000,
        }
        if command.first_data:
            row["first_data_min_ms"] = min(command.first_data) * 1000
            row["first_data_median_ms"] = statistics.median(command.first_data) * 1000
        rows[name] = row
    help_min = rows["vmkeep --help"]["min_ms"]
    for name, row in rows.items():
        if name in TARGETS_MS:
            row["target_ms"] = TARGETS_MS[name]
            row["ok"] = row["min_ms"] < TARGETS_MS[name]
        elif not name.startswith("vmkeep"):
            row["ratio_vmkeep_help_over_peer"] = help_min / row["min_ms"]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'command':<24} {'min ms':>8} {'median ms':>10}  verdict / first data step")
    for name, row in rows.items():
        if "target_ms" in row:
            verdict = f"{'OK' if row['ok'] else 'SLOW'} (target < {row['target_ms']:.0f} ms)"
        elif "first_data_min_ms" in row:
            verdict = (
                f"first data step: min {row['first_data_min_ms']:.1f}, "
                f"median {row['first_data_median_ms']:.1f} ms"
            )
        else:
            verdict = f"peer: vmkeep --help takes {row['ratio_vmkeep_help_over_peer']:.2f}x"
        print(f"{name:<24} {row['min_ms']:8.1f} {row['median_ms']:10.1f}  {verdict}")
    if not cold:
        print("(no cold runs: --no-cold, or the page cache cannot be dropped without root)")


if __name__ == "__main__":
    main()
