"""Smoke test of bench/manifest_memory.py at small sizes: every case runs and reports its
multiple of the ID table, and the stream case removes its repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "manifest_memory.py"


def test_every_case_reports(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    argv = [sys.executable, str(BENCH), "--chunks", "4Ki,8Ki", "--stream", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True, env=env)
    out = done.stdout
    assert len(out.splitlines()) == 6, out
    for size in ("4Ki", "8Ki"):
        for op in ("encode", "decode"):
            assert re.search(rf"{size} chunks .* {op}: transient peak \d+ MiB", out)
        assert re.search(rf"{size} chunks, 2 points .* peak RSS \d+ MiB", out)
    assert not list(tmp_path.glob("vmkeep-mfmem-*"))  # its own TMPDIR: no other run counts
