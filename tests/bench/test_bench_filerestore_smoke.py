"""Smoke test of bench/filerestore.py on a tiny disk: both ways give the file's bytes, and
file restore fetches a few chunks' worth (format 3: mostly single blocks), not the disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "filerestore.py"


def test_filerestore_bench_smoke(tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None:
        pytest.skip("needs e2fsprogs")
    work = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--size-gib", "0.125", "--workdir", str(work), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["files_get"]["ok"] and result["restore_then_debugfs"]["ok"]
    assert result["disk_chunks"] == 32
    got = result["files_get"]
    assert got["fetched_chunks"] + got["fetched_blocks"] >= 1
    assert got["fetched_bytes"] <= 8 * 4 * 2**20  # at most 8 of the 32 allocated chunks
    assert not work.exists()
