"""Smoke test of bench/core.py: a 128 MiB image through every tool that is installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CORE = Path(__file__).resolve().parents[2] / "bench" / "core.py"
CHUNK = 4 * 1024 * 1024  # vmkeep's chunk size, repository format v1


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("bench") / "work"
    argv = [sys.executable, str(CORE), "--size-gib", "0.125", "--workdir", str(work)]
    done = subprocess.run(
        [*argv, "--json", "--no-install"], capture_output=True, text=True, timeout=900
    )
    assert done.stdout, f"no JSON on stdout (exit {done.returncode}): {done.stderr[-2000:]}"
    data: dict[str, Any] = json.loads(done.stdout)
    assert not work.exists(), "the workdir is removed without --keep"
    return data


def test_image_is_sparse_and_changed(result: dict[str, Any]) -> None:
    image = result["image"]
    assert image["allocated"] == image["size"] // 2
    assert abs(image["allocated_on_disk"] - image["size"] // 2) < image["size"] * 0.05
    assert image["sha256_original"] != image["sha256_changed"]
    assert result["change"]["bytes"] == pytest.approx(image["size"] * 0.01, rel=0.05)


@pytest.mark.parametrize("peer", ["restic", "borg"])
def test_peer_round_trip(result: dict[str, Any], peer: str) -> None:
    tool = result["tools"][peer]
    if tool["status"] == "skipped":
        print(f"{peer}: {tool['reason']}")
        pytest.skip(f"{peer}: {tool['reason']}")
    assert tool["status"] == "ok", tool["reason"]
    assert tool["restore_ok"] is True
    assert tool["repo_bytes"]["second"] > 0


def test_vmkeep_round_trip(result: dict[str, Any]) -> None:
    tool = result["tools"]["vmkeep"]
    assert tool["status"] == "ok", tool["reason"]
    assert tool["restore_ok"] is True
    assert set(tool["steps"]) == {"init", "first", "second", "restore"}


def test_disk_floors_read_and_write_what_the_steps_do(result: dict[str, Any]) -> None:
    """bench/io_floor.py under vmkeep's full backup and restore: the image's data and a
    full's worth of the repository read, what the full stored and the restored data written."""
    tool, floors = result["tools"]["vmkeep"], result["disk_floor"]
    assert tool["status"] == "ok", tool["reason"]
    allocated = result["image"]["allocated"]
    first, restore = floors["first"], floors["restore"]
    assert first["read_bytes"] == pytest.approx(allocated, rel=0.05)
    assert first["write_bytes"] == tool["repo_bytes"]["first"]
    assert restore["read_bytes"] >= tool["repo_bytes"]["first"] * 0.9  # a full's worth
    assert restore["write_bytes"] == pytest.approx(allocated, rel=0.1)
    assert first["seconds"] > 0 and restore["seconds"] > 0
    rows = {r["ratio"]: r["value"] for r in result["ratios"]}
    assert rows["vmkeep restore / its disk floor"] > 0


def test_vmkeep_delta_stores_only_changed_chunks(result: dict[str, Any]) -> None:
    tool = result["tools"]["vmkeep"]
    assert tool["status"] == "ok", tool["reason"]
    full, delta = tool["reports"]["first"], tool["reports"]["second"]
    assert full["bytes_new"] >= result["image"]["allocated"] * 0.9
    # The 1% change is scattered in 64 KiB blocks, so it touches most 4 MiB chunks of a
    # small image: the delta stores exactly those chunks, which is fewer than the full.
    touched = result["change"]["touched_4mib_chunks"]
    assert delta["bytes_new"] <= touched * CHUNK
    assert delta["bytes_written"] < full["bytes_written"]
    assert delta["bytes_new"] < full["bytes_new"]


def test_ok_flag_matches_tools(result: dict[str, Any]) -> None:
    tools = result["tools"].values()
    expected = all(t["status"] != "failed" and t["restore_ok"] is not False for t in tools)
    assert result["ok"] == (expected and result["tools"]["vmkeep"]["status"] == "ok")
