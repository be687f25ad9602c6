"""Smoke test of bench/manifest_table.py at small sizes: every step of version 1 and 2 runs
and reports its peak RSS, version 2's object is written, and the repository is removed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "manifest_table.py"


def test_every_step_reports(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    argv = [sys.executable, str(BENCH), "--ids", "4Ki,96Ki", "--old", "96Ki", "--mark"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True, env=env)
    out = done.stdout
    assert len(out.splitlines()) == 9, out
    for version, steps in ((1, 1), (2, 2)):
        for step in ("write", "read", "mark"):
            found = re.findall(rf"version {version}: {step}: peak RSS \d+ MiB", out)
            assert len(found) == steps, out
    assert re.search(r"3 MiB of IDs, 0 TiB, version 2: write: .* object 3 MiB", out)
    assert not list(tmp_path.glob("vmkeep-mtable-*"))  # its own TMPDIR: no other run counts


def test_the_mirror_step_reports(tmp_path: Path) -> None:
    """--mirror: a 96 Ki-ID point mirrored into a target that holds its (fake) chunks."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    argv = [sys.executable, str(BENCH), "--ids", "96Ki", "--old", "", "--mirror"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True, env=env)
    out = done.stdout
    assert len(out.splitlines()) == 3, out
    assert re.search(r"version 2: mirror: peak RSS \d+ MiB \(after opening .* object 3 MiB", out)
    assert not list(tmp_path.glob("vmkeep-mtable-*"))  # its own TMPDIR: no other run counts
