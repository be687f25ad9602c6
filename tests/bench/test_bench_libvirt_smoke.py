"""Smoke test of bench/libvirt_live.py: a 64 MiB disk of a running domain, vmkeep vs restic."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.libvirt import libvirt_env as lv

BENCH = Path(__file__).resolve().parents[2] / "bench" / "libvirt_live.py"
CHUNK = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    try:
        lv.ensure_libvirtd().close()
    except lv.LibvirtUnavailable as exc:
        pytest.skip(f"libvirt not usable: {exc}")
    if shutil.which("restic") is None:
        pytest.skip("restic not installed (apt-get install restic)")
    argv = [sys.executable, str(BENCH), "--size-gib", "0.0625", "--json", "--no-install"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout, done.stderr[-2000:]
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_delta_reads_only_the_chunks_the_guest_wrote(result: dict[str, Any]) -> None:
    change, vmkeep = result["change"], result["vmkeep"]
    assert change["blocks"] > 0 and change["touched_4mib_chunks"] > 0
    assert vmkeep["delta_bytes_read"] == change["touched_4mib_chunks"] * CHUNK, vmkeep
    assert not any("full read" in n for n in vmkeep["delta_notes"]), vmkeep["delta_notes"]
    assert vmkeep["full_bytes_read"] >= result["image"]["allocated"]


def test_restored_delta_equals_the_disk_and_every_step_is_timed(result: dict[str, Any]) -> None:
    assert result["restore_ok"] is True
    for step in ("vmkeep full", "restic 1st", "vmkeep delta", "restic 2nd", "vmkeep restore"):
        assert result["steps"][step]["seconds"] > 0, step
    assert set(result["ratios"]) == {
        "full: restic 1st / vmkeep full",
        "delta: restic 2nd / vmkeep delta",
    }
    assert result["repo_bytes"]["vmkeep"] > 0 and result["repo_bytes"]["restic"] > 0
    conn = lv.ensure_libvirtd()
    try:
        assert result["domain"] not in {d.name() for d in conn.listAllDomains()}
    finally:
        conn.close()
    assert not (lv.IMAGES_ROOT / result["domain"]).exists()  # the work directory is removed
