"""Symlinks and special files that would lead vmkeep out of bounds (issue 13 item 3): a disk of
vm.json resolving outside its VM directory, a FIFO or device as a disk or as a chunk, a
repository directory that links into another repository, a repository created over a user's
files (docs/CONNECTOR-FILES.md §3, docs/FORMAT.md §1)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.stored_data import data_objects, repo_format

from .conftest import Cli, refused, tree, victim_file

TIMEOUT = 60  # every refusal here is immediate; a hang shows as a subprocess timeout


def _add_disk(vm: Path, name: str, file: str, **extra: object) -> None:
    doc = json.loads((vm / "vm.json").read_text())
    doc["disks"].append({"name": name, "file": file, "format": "raw", **extra})
    (vm / "vm.json").write_text(json.dumps(doc))


def _points(cli: Cli, repo: Path) -> list[dict[str, object]]:
    return list(cli("list", "--remote", str(repo), "--json").json()["restore_points"])


def _chunk_bytes(repo: Path) -> bytes:
    return b"".join(p.read_bytes() for p in data_objects(repo))


@pytest.mark.parametrize("how", ["symlink", "symlinked-directory"])
def test_disk_resolving_outside_the_vm_directory_is_refused(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path, how: str
) -> None:
    victim, digest = victim_file(tmp_path)
    vm = make_vm()
    if how == "symlink":
        (vm / "secret.raw").symlink_to(victim)
        _add_disk(vm, "secret", "secret.raw")
    else:
        (vm / "sub").symlink_to(tmp_path)  # sub/shadow is the victim
        _add_disk(vm, "secret", "sub/shadow")
    chunks_before = _chunk_bytes(repo_dir)
    run = cli("backup", str(vm), "--remote", str(repo_dir), ok=False, timeout=TIMEOUT)
    assert "outside" in refused(run) and str(victim) in run.err
    assert _points(cli, repo_dir) == []
    assert _chunk_bytes(repo_dir) == chunks_before  # nothing of it stored
    listed = cli("vm", "list", str(vm.parent), "--json", timeout=TIMEOUT).json()
    assert listed == []  # skipped with a warning, like any broken VM
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest


def test_a_disk_marked_outside_is_backed_up(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    """The administrator's explicit `"outside": true` lets a disk live elsewhere."""
    elsewhere = tmp_path / "pool"
    elsewhere.mkdir()
    (elsewhere / "data.raw").write_bytes(os.urandom(1 << 20))
    vm = make_vm()
    (vm / "data.raw").symlink_to(elsewhere / "data.raw")
    _add_disk(vm, "data", "data.raw", outside=True)
    point = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    restored = cli(
        "restore", point, "--remote", str(repo_dir), "--to", str(tmp_path / "r"), "--json"
    ).json()
    copy = Path(restored["location"]) / "data.raw"
    assert not copy.is_symlink() and copy.read_bytes() == (elsewhere / "data.raw").read_bytes()
    assert "outside" not in (Path(restored["location"]) / "vm.json").read_text()


def test_a_symlink_inside_the_vm_directory_is_fine(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path
) -> None:
    vm = make_vm()
    (vm / "images").mkdir()
    (vm / "disk0.raw").rename(vm / "images" / "disk0.raw")
    (vm / "disk0.raw").symlink_to("images/disk0.raw")
    cli("backup", str(vm), "--remote", str(repo_dir), timeout=TIMEOUT)
    assert len(_points(cli, repo_dir)) == 1


def _special(kind: str, path: Path, tmp_path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    else:  # a character device: /dev/zero would be read for ever
        path.symlink_to("/dev/zero")


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory", "chardev"])
def test_a_special_file_as_disk_is_refused_without_hanging(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path, kind: str
) -> None:
    vm = make_vm()
    _special(kind, vm / "odd", tmp_path)
    _add_disk(vm, "odd", "odd", outside=True)  # even allowed outside: never a regular file
    began = time.monotonic()
    run = cli("backup", str(vm), "--remote", str(repo_dir), ok=False, timeout=TIMEOUT)
    assert "not a regular file" in refused(run)
    listed = cli("vm", "list", str(vm.parent), "--json", timeout=TIMEOUT).json()
    assert listed == []
    assert time.monotonic() - began < TIMEOUT / 2
    assert _points(cli, repo_dir) == []


def test_a_fifo_as_vm_json_does_not_hang_vm_list(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    vm = make_vm()
    (vm / "vm.json").unlink()
    os.mkfifo(vm / "vm.json")
    good = make_vm("good")
    listed = cli("vm", "list", str(good.parent), "--json", timeout=TIMEOUT).json()
    assert [v["name"] for v in listed] == ["good"]
    run = cli("backup", str(vm), "--remote", str(tmp_path / "nowhere"), ok=False, timeout=TIMEOUT)
    refused(run)


def test_chunks_linked_into_another_repository_are_not_swept(
    cli: Cli, make_vm: Callable[..., Path], any_repo: Path, tmp_path: Path
) -> None:
    """Repository B's chunks/ (format 3: packs/) is a symlink to repository A's: gc of B
    (which has no points, so every object it sees is garbage) must not delete A's data."""
    repo_dir = any_repo
    fmt = str(repo_format(repo_dir))
    data = "chunks" if fmt == "1" else "packs"
    cli("backup", str(make_vm()), "--remote", str(repo_dir))
    other = tmp_path / "other"
    cli("init", str(other), "--format", fmt)
    (other / data).mkdir(exist_ok=True)
    (other / data).rmdir()
    (other / data).symlink_to(repo_dir / data)
    before = tree(repo_dir)
    run = cli("gc", "--remote", str(other), ok=False, timeout=TIMEOUT)
    assert "symlink" in refused(run)
    assert tree(repo_dir) == before
    assert cli("verify", "--remote", str(repo_dir), "--json", timeout=TIMEOUT).json()["ok"]


def test_a_fifo_as_chunk_is_a_corrupt_object_not_a_hang(
    cli: Cli, make_vm: Callable[..., Path], any_repo: Path, tmp_path: Path
) -> None:
    """A chunk object (format 3: a pack) replaced by a FIFO."""
    repo_dir = any_repo
    point = cli("backup", str(make_vm()), "--remote", str(repo_dir), "--json").json()[
        "restore_point"
    ]
    chunk = data_objects(repo_dir)[0]
    chunk.unlink()
    os.mkfifo(chunk)
    began = time.monotonic()
    run = cli("verify", "--remote", str(repo_dir), "--json", ok=False, timeout=TIMEOUT)
    assert run.code == 3
    report = json.loads(run.out)
    bad = report["corrupt_chunks"] + report.get("missing_chunks", [])
    assert bad and (repo_format(repo_dir) != 1 or chunk.name in json.dumps(bad))
    restore = cli(
        "restore", point, "--remote", str(repo_dir), "--to", str(tmp_path / "r"),
        ok=False, timeout=TIMEOUT,
    )  # fmt: skip
    assert restore.code == 3 and "not a regular file" in refused(restore)
    assert time.monotonic() - began < TIMEOUT
    assert not (tmp_path / "r" / "web01").exists()


@pytest.mark.parametrize("command", ["init", "remote-add"])
def test_a_non_empty_directory_is_not_made_a_repository(
    cli: Cli, tmp_path: Path, command: str
) -> None:
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / ".tmp-draft").write_text("a user's file that gc must never touch\n")
    (home / "notes.txt").write_text("mine\n")
    before = tree(home)
    args = ["init", str(home)] if command == "init" else ["remote", "add", "h", str(home)]
    run = cli(*args, ok=False, timeout=TIMEOUT)
    assert "not empty" in refused(run) and str(home) in run.err
    assert tree(home) == before
    assert not (tmp_path / "config" / "remotes.json").exists()


def test_a_fresh_file_system_with_lost_found_is_accepted(cli: Cli, tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    (mount / "lost+found").mkdir(parents=True)
    cli("init", str(mount), timeout=TIMEOUT)
    assert (mount / "config").is_file()


def test_gc_purges_temporaries_only_where_the_layout_has_them(
    cli: Cli, make_vm: Callable[..., Path], chunk_repo: Path, tmp_path: Path
) -> None:
    repo_dir = chunk_repo  # chunks/XX/ fan-out directories (format 1)
    victim, digest = victim_file(tmp_path)
    cli("backup", str(make_vm()), "--remote", str(repo_dir))
    fanout = next(p for p in sorted((repo_dir / "chunks").iterdir()) if p.is_dir())
    stale = fanout / ".tmp-99999-0123456789ab"  # a dead writer's leftover: to be purged
    stale.write_bytes(b"half a chunk")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    keep = {
        repo_dir / "notes" / ".tmp-draft": "a user's own directory",
        repo_dir / "chunks" / "not-hex" / ".tmp-x": "not a fan-out directory",
    }
    for path, text in keep.items():
        path.parent.mkdir()
        path.write_text(text)
        os.utime(path, (old, old))
    (fanout / ".tmp-link").symlink_to(victim)
    cli("gc", "--remote", str(repo_dir), timeout=TIMEOUT)
    assert not stale.exists()
    assert all(p.read_text() == text for p, text in keep.items())
    assert (fanout / ".tmp-link").is_symlink()
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest
