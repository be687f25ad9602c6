"""Smoke test of bench/libvirt_live.py: 64 MiB disks of running domains, vmkeep vs virtnbdbackup
(plain and -z) and restic, every step of the comparison."""

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


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    try:
        lv.ensure_libvirtd().close()
    except lv.LibvirtUnavailable as exc:
        pytest.skip(f"libvirt not usable: {exc}")
    if shutil.which("restic") is None:
        pytest.skip("restic not installed (apt-get install restic)")
    if shutil.which("virtnbdbackup") is None:
        pytest.skip("virtnbdbackup not installed (apt-get install virtnbdbackup)")
    argv = [sys.executable, str(BENCH), "--size-gib", "0.0625", "--json", "--no-install"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout, done.stderr[-2000:]
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_delta_reads_only_the_chunks_the_guest_wrote(result: dict[str, Any]) -> None:
    change = result["change"]["scattered"]
    assert change["blocks"] > 0 and set(result["vmkeep"]) == {"4M", "256K"}
    data = result["image"]["data"]  # the qcow2 image's data clusters before the writes
    assert 0 < data <= result["image"]["allocated"]
    for label, v in result["vmkeep"].items():
        assert v["touched_chunks"] > 0, label
        # whole chunks: exactly the touched ones; read: their data, at least what was written
        assert v["delta_bytes_chunks"] == v["touched_chunks"] * v["chunk_size"], (label, v)
        assert change["bytes"] <= v["delta_bytes_read"] <= v["delta_bytes_chunks"], (label, v)
        assert not any("full read" in n for n in v["delta_notes"]), v["delta_notes"]
        # a full reads the allocated data (plus holes under 128 KiB between extents), not
        # the holes of its chunks
        assert data <= v["full_bytes_read"] < v["full_bytes_chunks"], (label, v)
    small, big = result["vmkeep"]["256K"], result["vmkeep"]["4M"]
    assert small["delta_bytes_chunks"] < big["delta_bytes_chunks"]


def test_every_restore_equals_its_disk_and_every_step_is_timed(result: dict[str, Any]) -> None:
    assert result["restore_ok"] == {
        "vmkeep 4M": True,
        "vmkeep 256K": True,
        "virtnbdbackup": True,
        "restic": True,
    }
    steps = result["steps"]
    for tool in ("vmkeep 4M", "vmkeep 256K", "virtnbdbackup"):
        for step in ("full", "scattered", "clustered", "no-change", "restore"):
            assert steps[f"{tool} {step}"]["seconds"] > 0, (tool, step)
    for step in ("full", "scattered"):
        assert steps[f"virtnbdbackup -z {step}"]["seconds"] > 0, step
    for step in ("full", "scattered", "clustered", "restore"):
        assert steps[f"restic {step}"]["seconds"] > 0, step
    for label in ("4M", "256K"):
        names = {x["name"] for x in result["vmkeep"][label]["ratios"]}
        assert {"full vs virtnbdbackup", "full vs virtnbdbackup -z", "full vs restic",
                "restore vs virtnbdrestore", "restore / its disk floor",
                "restore vs restic the disk allows at most"} <= names  # fmt: skip
        assert all(x["value"] > 0 for x in result["vmkeep"][label]["ratios"])


def test_stored_bytes_follow_the_writes(result: dict[str, Any]) -> None:
    """Each tool's store grew by at least the compressed change and -z stores less."""
    stored = result["stored"]
    assert 0 < stored["virtnbdbackup -z full"] < stored["virtnbdbackup full"]
    assert stored["virtnbdbackup full"] >= result["image"]["data"]
    assert 0 < stored["virtnbdbackup -z scattered"] < stored["virtnbdbackup scattered"]
    clustered = result["change"]["clustered"]["bytes"]
    assert stored["virtnbdbackup clustered"] >= clustered
    for label in ("4M", "256K"):
        assert stored[f"vmkeep {label} scattered"] > 0
        assert stored[f"vmkeep {label} no-change"] < stored[f"vmkeep {label} scattered"]
