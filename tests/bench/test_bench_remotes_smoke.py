"""Smoke test of bench/remotes.py: a 64 MiB image on the local remote and on SeaweedFS (S3)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REMOTES = Path(__file__).resolve().parents[2] / "bench" / "remotes.py"
KINDS = ("local", "s3")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("bench-remotes") / "work"
    argv = [sys.executable, str(REMOTES), "--size-gib", "0.0625", "--raw-mib", "32"]
    argv += ["--remotes", ",".join(KINDS), "--workdir", str(work), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.stdout, f"no JSON on stdout (exit {done.returncode}): {done.stderr[-2000:]}"
    data: dict[str, Any] = json.loads(done.stdout)
    assert not work.exists(), "the workdir is removed without --keep"
    return data


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_numbers(result: dict[str, Any], kind: str) -> None:
    remote = result["remotes"][kind]
    if remote["status"] == "unavailable":
        print(f"{kind}: {remote['reason']}")
        pytest.skip(f"{kind}: {remote['reason']}")
    assert remote["status"] == "ok", remote["reason"]
    vmkeep = remote["vmkeep"]
    assert vmkeep["restore_ok"] is True
    assert vmkeep["restore_sha256"] == result["image"]["sha256"]
    backup = vmkeep["reports"]["backup"]
    assert backup["bytes_read"] >= result["image"]["allocated"]
    assert 0 < backup["bytes_written"] < backup["bytes_read"]  # compressed
    raw = remote["raw"]
    assert raw is not None, remote.get("raw_reason")
    assert raw["bytes"] == 32 * 2**20
    assert raw["write_mb_per_s"] > 0 and raw["read_mb_per_s"] > 0
    ratios = {r["ratio"]: r for r in remote["ratios"]}
    for name in ("backup: data read / raw write", "backup: stored / raw write"):
        assert ratios[name]["value"] > 0
        assert ratios[name]["verdict"] in ("PASS", "MISS")


def test_restic_on_s3(result: dict[str, Any]) -> None:
    remote = result["remotes"]["s3"]
    if remote["status"] == "unavailable":
        pytest.skip(f"s3: {remote['reason']}")
    restic = remote["restic"]
    if restic["status"] == "n/a":
        pytest.skip(f"restic: {restic['reason']}")
    assert restic["status"] == "ok", restic["reason"]
    assert restic["restore_ok"] is True
    speedup = {r["ratio"]: r for r in remote["ratios"]}["backup speedup vs restic"]
    assert speedup["value"] > 0


def test_ok_flag(result: dict[str, Any]) -> None:
    statuses = [r["status"] for r in result["remotes"].values()]
    assert result["ok"] == ("failed" not in statuses and "ok" in statuses)
