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
    change = result["change"]
    assert change["blocks"] > 0 and set(result["vmkeep"]) == {"4M", "256K"}
    for label, v in result["vmkeep"].items():
        assert v["touched_chunks"] > 0, label
        assert v["delta_bytes_read"] == v["touched_chunks"] * v["chunk_size"], (label, v)
        assert not any("full read" in n for n in v["delta_notes"]), v["delta_notes"]
        assert v["full_bytes_read"] >= result["image"]["allocated"]
    small, big = result["vmkeep"]["256K"], result["vmkeep"]["4M"]
    assert small["delta_bytes_read"] < big["delta_bytes_read"]


def test_restored_delta_equals_the_disk_and_every_step_is_timed(result: dict[str, Any]) -> None:
    assert result["restore_ok"] == {"4M": True, "256K": True}
    for label in ("4M", "256K"):
        for step in ("full", "delta", "restore"):
            assert result["steps"][f"vmkeep {step} {label}"]["seconds"] > 0, (step, label)
        assert set(k for k in result["vmkeep"][label] if ":" in k) == {
            "full: restic 1st / vmkeep full",
            "delta: restic 2nd / vmkeep delta",
        }
    for step in ("restic 1st", "restic 2nd"):
        assert result["steps"][step]["seconds"] > 0, step
