"""The default format of a new repository: 3 (packs) at the default chunk size, 2 for an
explicit other chunk size, 1 (or 2) with retention locks, with a note; `--format` wins."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Cli

KiB, MiB = 1 << 10, 1 << 20


def config(repo: Path) -> dict[str, object]:
    return dict(json.loads((repo / "config").read_bytes()))


def test_init_without_format_stores_packs(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    assert cli("init", str(repo), "--json").json()["format"] == 3
    made = config(repo)
    assert (made["version"], made["block_size"], made["pack_size"]) == (3, 64 * KiB, 16 * MiB)
    cli("backup", str(make_vm()), "--remote", str(repo))
    assert any((repo / "packs").rglob("*")) and any((repo / "index").iterdir())
    assert not (repo / "chunks").exists()


@pytest.mark.parametrize(
    ("args", "version"),
    [
        (["--chunk-size", "256K"], 2),
        (["--format", "1"], 1),
        (["--format", "2"], 2),
        (["--format", "2", "--chunk-size", "1M"], 2),
        (["--format", "3", "--chunk-size", "256K"], 3),
        (["--block-size", "64K"], 3),
        (["--chunk-size", "256K", "--block-size", "64K"], 3),
    ],
)
def test_explicit_choices_are_kept(cli: Cli, tmp_path: Path, args: list[str], version: int) -> None:
    repo = tmp_path / "repo"
    assert cli("init", str(repo), *args, "--json").json()["format"] == version
    made = config(repo)
    assert made["version"] == version
    assert ("block_size" in made) == (version == 3)
    if "--block-size" in args:
        assert made["block_size"] == 64 * KiB


@pytest.mark.parametrize(("args", "version"), [([], 3), (["--chunk-size", "256K"], 2)])
def test_retention_locks_keep_the_default_format(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path, args: list[str], version: int
) -> None:
    """Format 3 holds retention locks (docs/IMMUTABILITY.md "Format 3"): a locked remote gets
    the same default format as any other, and its locked backups work."""
    repo = tmp_path / "repo"
    run = cli("remote", "add", "vault", str(repo), *args, "--lock-days", "1")
    assert config(repo)["version"] == version
    assert f"format {version}" in run.out + run.err
    point = cli("backup", str(make_vm()), "--remote", "vault", "--json").json()["restore_point"]
    assert [p.name for p in (repo / "retention").iterdir()] == [point]  # its lock record
    record = json.loads((repo / "retention" / point).read_text())
    named = set(record["objects"])
    want = {"config", "manifests", *(["packs", "index"] if version == 3 else ["chunks"])}
    assert {n.split("/")[0] for n in named} == want
