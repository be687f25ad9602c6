"""Hostile-input fixtures: the e2e CLI fixtures, plus what every hostile test checks (one
`error:` line, an exit code that is neither 0 nor 70, nothing changed outside the target)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from tests.e2e.conftest import PASSPHRASE, Cli, Run, cli, make_vm, repo_dir, sha256  # noqa: F401

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
