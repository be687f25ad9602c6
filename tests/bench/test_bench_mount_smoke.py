"""Smoke test of bench/mount.py on a 32 MiB disk: every way out of the repository (export,
FUSE mount, vmkeep's NBD server, nbdkit's Python plugin) runs and gives the source's bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "mount.py"


def test_bench_mount_smoke(tmp_path: Path) -> None:
    work = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--size-mib", "32", "--json", "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)
    results = data["results"]
    expected = {"export raw", "nbd qemu-img"}
    if os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3"):
        expected.add("mount cat")
    if shutil.which("nbdkit"):
        expected.add("nbdkit qemu-img")
    assert expected <= set(results)
    for name in expected:
        assert results[name]["same"] is True, name  # bytes equal to the source image
        assert results[name]["seconds"] > 0 and results[name]["ratio_to_export"] > 0
    assert not work.exists(), "the workdir is removed without --keep"
