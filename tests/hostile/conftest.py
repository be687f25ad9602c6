"""Hostile-input fixtures: the e2e CLI fixtures, plus what every hostile test checks (one
`error:` line, an exit code that is neither 0 nor 70, nothing changed outside the target) and
a run that measures the child's peak RSS."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.conftest import (  # noqa: F401
    PASSPHRASE,
    VMKEEP,
    Cli,
    Run,
    any_repo,
    chunk_repo,
    cli,
    make_vm,
    repo_dir,
    sha256,
)

INTERNAL_ERROR = 70
PASSPHRASE_BYTES = PASSPHRASE.encode()


def refused(run: Run) -> str:
    """The one error line of a refused command (Cli(ok=False) checked the exit and the line)."""
    assert run.code not in (0, INTERNAL_ERROR), run
    lines = [line for line in run.err.strip().splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("error:")]) == 1, run.err
    return lines[-1]


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root` (not following symlinks): files by sha256, symlinks by target,
    other kinds by type, so any write, creation or removal shows as a difference."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                out[rel] = "link:" + os.readlink(path)
            elif stat.S_ISREG(mode):
                out[rel] = "file:" + sha256(path)
            elif stat.S_ISDIR(mode):
                out[rel] = "dir"
            else:
                out[rel] = f"special:{stat.S_IFMT(mode)}"
    return out


def victim_file(tmp_path: Path) -> tuple[Path, str]:
    """A file standing in for /etc/shadow: it must never be written, nor backed up."""
    path = tmp_path / "shadow"
    path.write_bytes(b"root:$6$secret-hash-that-must-not-leak:19000:0:99999:7:::\n" * 100)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


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
