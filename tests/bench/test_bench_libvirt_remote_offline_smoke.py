"""Smoke test of bench/libvirt_remote_offline.py: a 64 MiB shut-off domain over qemu+ssh://."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.ssh_transport import SSHD

BENCH = Path(__file__).resolve().parents[2] / "bench" / "libvirt_remote_offline.py"
KiB = 1 << 10
MiB = 1 << 20


def test_remote_offline_bench_reads_only_what_changed() -> None:
    try:
        lv.ensure_libvirtd().close()
    except lv.LibvirtUnavailable as exc:
        pytest.skip(f"libvirt not usable: {exc}")
    if not Path(SSHD).exists() or shutil.which("ssh") is None:
        pytest.skip("openssh-server / ssh not installed (scripts/install-libvirt.sh adds them)")
    argv = [sys.executable, str(BENCH), "--size-mib", "64", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout)
    read, chunks = result["bytes_read"], result["bytes_chunks"]
    # the written half: all data, in whole 4 MiB chunks
    assert read["vmkeep full"] == chunks["vmkeep full"] == 32 * MiB
    assert result["changed_blocks"] == 10 and result["touched_chunks"] > 0
    assert chunks["vmkeep delta"] == result["touched_chunks"] * 4 * MiB  # only those chunks
    # of them, only the dirty blocks (format 3, the default: 64 KiB blocks, the writes are
    # 64 KiB-aligned), not the touched chunks whole (docs/DATA-PATH.md "Deltas read only the
    # dirty blocks")
    changed = result["changed_blocks"] * 64 * KiB
    assert changed <= read["vmkeep delta"] <= 2 * changed < chunks["vmkeep delta"], result
    assert read["vmkeep no change"] == chunks["vmkeep no change"] == 0
    assert result["restore of the last point == image"] is True
    for key in ("full: ssh cat / vmkeep full", "delta: ssh cat / vmkeep delta"):
        assert result[key] > 0, key
