"""`vmkeep mirror` end to end: two repositories with different passphrases (local, and an S3
target on a real SeaweedFS), demo VMs backed up twice, the target verifies and restores
hash-equal, an incremental run uploads nothing, a new backup uploads only its new chunks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PASSPHRASE, Cli, disk_hashes
from .test_remotes_cli import _s3

TARGET_PASSPHRASE = "a different target passphrase"
TARGET = {"VMKEEP_PASSPHRASE": TARGET_PASSPHRASE}


def chunk_files(repo: Path) -> set[str]:
    return {p.name for p in (repo / "chunks").rglob("*") if p.is_file()}


def demo_vms(cli: Cli, tmp_path: Path, repo: str) -> dict[str, dict[str, str]]:
    """Two demo VMs, each backed up full then delta after a change: point -> disk hashes."""
    expected = {}
    for name in ("web01", "db01"):
        cli("vm", "create-demo", str(tmp_path / "vms"), "--name", name, "--size", "32")
        vm = tmp_path / "vms" / name
        for mode, seed in (("full", 0), ("delta", 1)):
            if seed:
                cli("vm", "change-demo", str(vm), "--seed", str(seed))
            point = cli("backup", str(vm), "-r", repo, "--mode", mode, "--json").json()
            expected[point["restore_point"]] = disk_hashes(vm)
    return expected


def restored(
    cli: Cli, tmp_path: Path, repo: str, point: str, env: dict[str, str]
) -> dict[str, str]:
    where = tmp_path / "restores" / point
    out = cli("restore", point, "--to", str(where), "-r", repo, "--json", env=env).json()
    return disk_hashes(Path(out["location"]))


def test_mirror_between_passphrases(cli: Cli, tmp_path: Path) -> None:
    source, target = tmp_path / "src", tmp_path / "dst"
    cli("init", str(source), "--chunk-size", "256K")
    cli("init", str(target), "--chunk-size", "256K", env=TARGET)
    expected = demo_vms(cli, tmp_path, str(source))

    mirrored = cli(
        "mirror", str(source), str(target), "--mode", "full", "--json",
        env={"VMKEEP_TARGET_PASSPHRASE": TARGET_PASSPHRASE},
    ).json()  # fmt: skip
    assert {p["point_id"]: p["status"] for p in mirrored["points"]} == dict.fromkeys(
        expected, "copied"
    )
    assert mirrored["totals"]["chunks_uploaded"] == len(chunk_files(target)) > 0
    assert chunk_files(target).isdisjoint(chunk_files(source))

    # The target opens with its own passphrase only, verifies, and restores hash-equal.
    cli("verify", "-r", str(target), env={"VMKEEP_PASSPHRASE": "e2e passphrase"}, ok=False)
    assert cli("verify", "-r", str(target), "--json", env=TARGET).json()["ok"]
    for point, hashes in expected.items():
        assert restored(cli, tmp_path, str(target), point, TARGET) == hashes

    before = chunk_files(target)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "src").write_text(PASSPHRASE + "\n")
    (secrets / "dst").write_text(TARGET_PASSPHRASE + "\n")
    files = ["--source-passphrase-file", str(secrets / "src")]
    files += ["--target-passphrase-file", str(secrets / "dst")]
    again = cli(
        "mirror", str(source), str(target), *files, "--json", env={"VMKEEP_PASSPHRASE": "x"}
    )
    assert again.json()["totals"]["chunks_uploaded"] == 0
    assert again.json()["totals"]["present"] == len(expected)
    assert chunk_files(target) == before

    web = tmp_path / "vms" / "web01"
    cli("vm", "change-demo", str(web), "--seed", "2")
    source_before = chunk_files(source)
    new = cli("backup", str(web), "-r", str(source), "--mode", "delta", "--json").json()
    new_in_source = len(chunk_files(source) - source_before)
    assert new_in_source > 0
    out = cli("mirror", str(source), str(target), *files, "--vm", "web*", "--json").json()
    assert {p["point_id"]: p["status"] for p in out["points"]}[new["restore_point"]] == "copied"
    assert all(p["vm"] == "web01" for p in out["points"])
    assert len(chunk_files(target) - before) == new_in_source == out["totals"]["chunks_uploaded"]
    point = new["restore_point"]
    assert restored(cli, tmp_path, str(target), point, TARGET) == disk_hashes(web)


def test_mirror_refusals_are_one_line(cli: Cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    cli("init", str(source))
    own = cli("mirror", str(source), str(source), ok=False)
    assert own.code == 2 and "its own source" in own.err
    # The same repository under another spelling is known by its id once opened.
    cli("remote", "add", "home", str(source))
    alias = cli("mirror", "home", str(source) + "/", ok=False)
    assert alias.code == 2 and "its own source" in alias.err
    other = tmp_path / "other"
    cli("init", str(other), "--chunk-size", "1M")
    sizes = cli("mirror", str(source), str(other), ok=False)
    assert sizes.code == 2 and "chunk size" in sizes.err
    mode = cli("mirror", str(source), str(other), "--mode", "sideways", ok=False)
    assert mode.code == 2 and "--mode" in mode.err
    missing = cli("mirror", str(source), str(tmp_path / "nowhere"), ok=False)
    assert "no vmkeep repository" in missing.err


@pytest.fixture
def s3_target() -> Iterator[tuple[str, dict[str, str]]]:
    yield from _s3()


def test_mirror_to_s3(cli: Cli, tmp_path: Path, s3_target: tuple[str, dict[str, str]]) -> None:
    url, creds = s3_target
    source = tmp_path / "src"
    cli("init", str(source))
    env = dict(creds, **TARGET)
    cli("init", url, env=env)
    expected = demo_vms(cli, tmp_path, str(source))
    mirror_env = dict(creds, VMKEEP_TARGET_PASSPHRASE=TARGET_PASSPHRASE)
    out = cli("mirror", str(source), url, "--json", env=mirror_env).json()
    assert out["ok"] and out["totals"]["copied"] == len(expected)
    again = cli("mirror", str(source), url, "--json", env=mirror_env).json()
    assert again["totals"]["chunks_uploaded"] == again["totals"]["bytes_fetched"] == 0
    listed = cli("list", "-r", url, "--json", env=env).json()
    assert {r["restore_point"] for r in listed["restore_points"]} == set(expected)
    assert json.loads(cli("verify", "-r", url, "--json", env=env).out)["ok"]
    for point, hashes in expected.items():
        assert restored(cli, tmp_path, url, point, env) == hashes
