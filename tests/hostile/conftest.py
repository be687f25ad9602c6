"""Hostile-input fixtures: the e2e CLI helpers, plus a run that measures the child's peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.conftest import VMKEEP, Cli, Run, cli, make_vm, repo_dir  # noqa: F401

# A fresh interpreter runs vmkeep and reports its children's peak RSS: RUSAGE_CHILDREN of the
# test process itself would hold the maximum of every child it ever waited for.
_MEASURE = (
    "import json, resource, subprocess, sys\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'code': p.returncode, 'out': p.stdout, 'err': p.stderr, 'kib': r}))\n"
)


@dataclass
class Measured:
    run: Run
    peak_mib: float
    seconds: float


def measured(runner: Cli, *args: str, timeout: float = 300) -> Measured:
    """`vmkeep ARGS` with its peak resident memory and wall time."""
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, VMKEEP, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=runner.env,
        stdin=subprocess.DEVNULL,
        check=True,
    )
    seconds = time.monotonic() - began
    doc = json.loads(proc.stdout)
    return Measured(Run(doc["code"], doc["out"], doc["err"]), doc["kib"] / 1024, seconds)


def one_error_line(run: Run) -> str:
    """A refusal: one `error:` line on stderr, a non-zero exit that is not 70 (internal)."""
    assert run.code not in (0, 70), (run.code, run.err)
    assert "Traceback" not in run.err, run.err
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.err
    return lines[0]


def sparse(path: Path, size: int) -> None:
    """Make `path` a file of `size` bytes that takes no space (a hostile huge object)."""
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(size)
