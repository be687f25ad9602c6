"""Whoever can write a directory vmkeep writes into (an export's output directory, a restore
target, the config directory, a VM directory) plants symlinks at the names vmkeep would choose:
no write may go through them (issue 13 item 2; docs/CONNECTOR-FILES.md §3)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vmkeep.connectors.files.qcow2_writer import Qcow2DiskWriter
from vmkeep.connectors.files.raw import RawDiskWriter
from vmkeep.connectors.files.vhd_writer import VhdDiskWriter
from vmkeep.errors import ConnectorError
from vmkeep.operations.export import export_disk
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

from .conftest import PASSPHRASE_BYTES, Cli, refused, sha256, tree, victim_file


@pytest.mark.parametrize("writer", [RawDiskWriter, Qcow2DiskWriter, VhdDiskWriter])
@pytest.mark.parametrize("dangling", [False, True])
def test_new_image_is_never_written_through_a_planted_symlink(
    tmp_path: Path, writer: Callable[..., object], dangling: bool
) -> None:
    victim, digest = victim_file(tmp_path)
    target = tmp_path / "not-yet" if dangling else victim  # O_CREAT would create it
    out = tmp_path / "out"
    out.mkdir()
    (out / "disk.img").symlink_to(target)
    with pytest.raises(ConnectorError, match="already exists"):
        writer(out / "disk.img", 1 << 20)
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "not-yet").exists()


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vhd"])
def test_export_ignores_symlinks_at_its_old_predictable_temporary_name(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path, fmt: str
) -> None:
    """Export used `.<output>.partial-<pid>` with O_CREAT|O_TRUNC: a symlink planted there made
    it overwrite any file. Run in this process, so the pid it would have used is known."""
    victim, digest = victim_file(tmp_path)
    vm = make_vm()
    point = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    output = out_dir / "disk0.img"
    (out_dir / f".{output.name}.partial-{os.getpid()}").symlink_to(victim)
    before = tree(out_dir)
    repo = Repository.open(LocalRemote(repo_dir), lambda: PASSPHRASE_BYTES)
    export_disk(repo, point, "disk0", fmt, output, SilentProgress())
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest
    after = tree(out_dir)
    assert set(after) - set(before) == {"disk0.img"}  # only the output, no temporary left
    assert {k: v for k, v in after.items() if k in before} == before
    if fmt == "raw":
        assert sha256(output) == sha256(vm / "disk0.raw")


def test_export_refuses_an_output_that_is_a_symlink(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    victim, digest = victim_file(tmp_path)
    point = cli("backup", str(make_vm()), "--remote", str(repo_dir), "--json").json()[
        "restore_point"
    ]
    output = tmp_path / "out.raw"
    output.symlink_to(victim)
    run = cli(
        "export", point, "disk0", str(output), "--remote", str(repo_dir), ok=False, timeout=60
    )
    assert "refusing to overwrite" in refused(run)
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest


def test_remote_registry_never_writes_through_its_old_temporary_name(
    cli: Cli, tmp_path: Path
) -> None:
    """Named remotes now live in the state database; the JSON registry's writer remains (the
    one-time import reads its file). It wrote `remotes.tmp` with O_CREAT|O_TRUNC, then renamed
    it: neither the CLI (database) nor the JSON writer follows a planted temporary name."""
    from vmkeep.engine.remote_registry import RemoteRegistry

    victim, digest = victim_file(tmp_path)
    config = tmp_path / "config"
    config.mkdir()
    (config / "remotes.tmp").symlink_to(victim)
    cli("remote", "add", "main", str(tmp_path / "repo"), timeout=60)
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest
    assert (config / "remotes.tmp").is_symlink()  # left alone, not followed
    assert [e["name"] for e in json.loads(cli("remote", "list", "--json").out)] == ["main"]
    assert not (config / "remotes.json").exists()  # the database holds it now

    json_registry = RemoteRegistry(config / "remotes.json")
    json_registry.add("other", str(tmp_path / "repo2"))
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest
    assert (config / "remotes.tmp").is_symlink()
    entries = json.loads((config / "remotes.json").read_text())["remotes"]
    assert [e["name"] for e in entries] == ["other"]
    assert not (config / "remotes.json").is_symlink()
    assert not [p for p in config.iterdir() if ".tmp-" in p.name]  # no temporary left


def test_in_place_restore_of_a_qcow2_disk_writes_no_planted_name(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    """The in-place copy of a qcow2 disk is created with O_EXCL|O_NOFOLLOW: symlinks planted
    at names like it are never followed, and the restore still completes."""
    victim, digest = victim_file(tmp_path)
    vm = make_vm(fmt="qcow2")
    point = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    for i in range(20):
        (vm / f".disk0.qcow2.{i:012x}").symlink_to(victim)
    cli("restore", point, "--remote", str(repo_dir), "--to", str(vm), "--in-place", timeout=120)
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest
    assert not (vm / "vm.json.incomplete").exists()
