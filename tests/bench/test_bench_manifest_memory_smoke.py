"""Smoke test of bench/manifest_memory.py at small sizes: every case runs and reports its
multiple of the ID table, and the stream case removes its repository."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "manifest_memory.py"


def test_every_case_reports() -> None:
    before = set(Path(tempfile.gettempdir()).glob("vmkeep-mfmem-*"))
    argv = [sys.executable, str(BENCH), "--chunks", "4Ki,8Ki", "--stream", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    out = done.stdout
    assert len(out.splitlines()) == 6, out
    for size in ("4Ki", "8Ki"):
        for op in ("encode", "decode"):
            assert re.search(rf"{size} chunks .* {op}: transient peak \d+ MiB", out)
        assert re.search(rf"{size} chunks, 2 points .* peak RSS \d+ MiB", out)
    assert set(Path(tempfile.gettempdir()).glob("vmkeep-mfmem-*")) == before
