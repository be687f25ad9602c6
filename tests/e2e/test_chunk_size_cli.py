"""`vmkeep init --chunk-size` through the real command: spellings, refusals in one line, and a
256 KiB repository whose delta stores only the touched 256 KiB chunks and restores exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import Cli, sha256, vm_disks
from .test_faults import random_vm

KiB, MiB = 1 << 10, 1 << 20


@pytest.mark.parametrize(
    ("text", "size", "version"),
    [("256K", 256 * KiB, 2), ("64KiB", 64 * KiB, 2), ("1M", MiB, 2), ("4MiB", 4 * MiB, 3)],
)
def test_init_chunk_size_spellings(
    cli: Cli, tmp_path: Path, text: str, size: int, version: int
) -> None:
    out = cli("init", str(tmp_path / "r"), "--encryption", "none", "--chunk-size", text, "--json")
    assert out.json()["chunk_size"] == size
    config = json.loads((tmp_path / "r" / "config").read_bytes())
    assert (config["version"], config["chunk_size"]) == (version, size)
    listing = cli("list", "--remote", str(tmp_path / "r"), "--json").json()
    assert listing["chunk_size"] == size and listing["restore_points"] == []


def test_init_default_and_bytes(cli: Cli, tmp_path: Path) -> None:
    cli("init", str(tmp_path / "a"), "--encryption", "none")
    assert json.loads((tmp_path / "a" / "config").read_bytes())["version"] == 3  # packs
    cli("init", str(tmp_path / "b"), "--encryption", "none", "--chunk-size", "131072")
    assert json.loads((tmp_path / "b" / "config").read_bytes())["chunk_size"] == 131072


@pytest.mark.parametrize("text", ["3M", "32K", "abc", "0", "8M", "1G", "256KB", "-1", "4.5M"])
def test_init_refuses_bad_chunk_size_in_one_line(cli: Cli, tmp_path: Path, text: str) -> None:
    run = cli("init", str(tmp_path / "r"), "--encryption", "none", f"--chunk-size={text}", ok=False)
    assert run.code == 2
    (line,) = [x for x in run.err.splitlines() if x.strip()]
    assert "invalid --chunk-size" in line and "power of two from 64 KiB to 4 MiB" in line, line
    assert not (tmp_path / "r" / "config").exists()


def test_remote_add_makes_a_repository_with_the_chunk_size(cli: Cli, tmp_path: Path) -> None:
    cli("remote", "add", "nas", str(tmp_path / "r"), "--encryption", "none", "--chunk-size", "128K")
    assert json.loads((tmp_path / "r" / "config").read_bytes())["chunk_size"] == 128 * KiB
    assert cli("list", "--remote", "nas", "--json").json()["chunk_size"] == 128 * KiB
    bad = cli("remote", "add", "x", str(tmp_path / "x"), "--chunk-size", "96K", ok=False)
    assert bad.code == 2 and "invalid --chunk-size" in bad.err
    assert not (tmp_path / "x").exists()


def test_hostile_chunk_size_in_config_is_one_line(cli: Cli, tmp_path: Path) -> None:
    cli("init", str(tmp_path / "r"), "--encryption", "none", "--chunk-size", "256K")
    path = tmp_path / "r" / "config"
    for version, chunk_size in ((2, 3), (2, "x"), (2, 1 << 30), (1, 256 * KiB), (3, 256 * KiB)):
        config = json.loads(path.read_bytes())
        config.update(version=version, chunk_size=chunk_size)
        path.write_text(json.dumps(config))
        run = cli("list", "--remote", str(tmp_path / "r"), ok=False)
        (line,) = [x for x in run.err.splitlines() if x.strip()]
        # version 3 exists now (packs): without its block_size it is refused as well
        assert ("chunk_size" in line or "block_size" in line) and run.code == 1, line


def test_256k_repository_delta_and_restore(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli("init", str(repo), "--chunk-size", "256K")
    vm = random_vm(tmp_path, "small", 16 * MiB, 5)
    disk = vm / "disk0.img"
    expected = {}
    full = cli("backup", str(vm), "--remote", str(repo), "--json").json()
    expected[full["restore_point"]] = sha256(disk)
    assert full["chunks"] % 4 == 0 and full["chunks"] >= 4 * 8  # random MiB = 4 chunks each
    writes = [(4096, 512), (3 * MiB + 100, 4096), (9 * MiB + 256 * KiB - 10, 20)]
    with open(disk, "r+b") as f:
        for offset, n in writes:
            f.seek(offset)
            f.write(os.urandom(n))
    delta = cli("backup", str(vm), "--remote", str(repo), "--mode", "delta", "--json").json()
    expected[delta["restore_point"]] = sha256(disk)
    # 1 + 1 + 2 (straddles a 256 KiB boundary) chunks: 1 MiB stored, not 3 x 4 MiB.
    assert delta["chunks_new"] == 4 and delta["bytes_new"] == 4 * 256 * KiB
    for i, (point, digest) in enumerate(expected.items()):
        out = cli(
            "restore", point, "--remote", str(repo), "--to", str(tmp_path / f"r{i}"), "--json"
        ).json()
        (restored,) = vm_disks(Path(out["location"])).values()
        assert sha256(restored) == digest
