"""verify, gc, prune, forget, remote commands through the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.stored_data import data_names, data_objects, repo_format

from .conftest import Cli


def _chunk_files(repo: Path) -> set[str]:
    return {p.name for p in (repo / "chunks").rglob("*") if p.is_file()}


def test_verify_reports_corrupt_chunk_with_its_points(
    cli: Cli, make_vm: Callable[..., Path], any_repo: Path, tmp_path: Path
) -> None:
    """Format 1: the damaged chunk object is named; format 3: a damaged pack (of the first
    backup) is reported as the chunks whose blocks it held."""
    from vmkeep.connectors.files.demo import modify_demo_vm

    repo_dir = any_repo
    vm = make_vm()
    p1 = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    modify_demo_vm(vm, 3)
    p2 = cli("backup", str(vm), "--remote", str(repo_dir), "--mode", "delta", "--json").json()[
        "restore_point"
    ]
    assert cli("verify", "--remote", str(repo_dir), "--json").json()["ok"] is True
    # a chunk (or pack) shared by both points (present since the first backup, not rewritten)
    victim = min(data_objects(repo_dir), key=lambda p: p.stat().st_mtime)
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0x04
    victim.write_bytes(bytes(blob))
    run = cli("verify", "--remote", str(repo_dir), "--json", ok=False)
    assert run.code == 3
    report = json.loads(run.out)
    if repo_format(repo_dir) == 1:
        assert [c["chunk_id"] for c in report["corrupt_chunks"]] == [victim.name]
    assert report["corrupt_chunks"] and all(c["points"] for c in report["corrupt_chunks"])
    assert set(report["corrupt_chunks"][0]["points"]) <= {p1, p2}
    assert report["corrupt_chunks"][0]["points"]
    bad_point = report["corrupt_chunks"][0]["points"][0]
    restore = cli(
        "restore", bad_point, "--remote", str(repo_dir), "--to", str(tmp_path / "r"), ok=False
    )
    assert restore.code == 3 and "corrupt" in restore.err
    assert not (tmp_path / "r" / "web01").exists()  # no half-restored VM left behind


def test_verify_reports_corrupt_manifest(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path
) -> None:
    point = cli("backup", str(make_vm()), "--remote", str(repo_dir), "--json").json()[
        "restore_point"
    ]
    path = repo_dir / "manifests" / point
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x10
    path.write_bytes(bytes(blob))
    run = cli("verify", "--remote", str(repo_dir), "--json", ok=False)
    assert json.loads(run.out)["corrupt_manifests"][0]["point_id"] == point
    listing = cli("list", "--remote", str(repo_dir), "--json").json()
    assert listing["restore_points"] == [] and listing["unreadable"][0]["point_id"] == point
    gc = cli("gc", "--remote", str(repo_dir), ok=False)  # never sweeps what it cannot read
    assert "refuses" in gc.err and data_names(repo_dir)


def test_forget_then_gc_removes_exactly_the_unreferenced_chunks(
    cli: Cli, make_vm: Callable[..., Path], chunk_repo: Path, tmp_path: Path
) -> None:
    """Chunk objects (format 1); format 3's pack sweep: tests/e2e/test_format3_gc.py."""
    repo_dir = chunk_repo
    a, b = make_vm("a"), make_vm("b")
    pa = cli("backup", str(a), "--remote", str(repo_dir), "--json").json()["restore_point"]
    only_a = _chunk_files(repo_dir)
    pb = cli("backup", str(b), "--remote", str(repo_dir), "--json").json()["restore_point"]
    both = _chunk_files(repo_dir)
    assert cli("gc", "--remote", str(repo_dir), "--json").json()["chunks_deleted"] == 0
    cli("forget", pa, "--remote", str(repo_dir))
    dry = cli("gc", "--remote", str(repo_dir), "--dry-run", "--json").json()
    assert _chunk_files(repo_dir) == both
    report = cli("gc", "--remote", str(repo_dir), "--json").json()
    left = _chunk_files(repo_dir)
    assert report["chunks_deleted"] == dry["chunks_deleted"] == len(both - left) > 0
    assert (both - left) <= only_a  # only chunks a alone referenced can go
    out = cli(
        "restore", pb, "--remote", str(repo_dir), "--to", str(tmp_path / "r"), "--json"
    ).json()
    assert Path(out["location"], "vm.json").exists()
    assert cli("verify", "--remote", str(repo_dir), "--json").json()["ok"]


def test_gc_refuses_while_a_backup_holds_its_lock(cli: Cli, repo_dir: Path) -> None:
    from vmkeep.remotes.local import LocalRemote
    from vmkeep.repository.locks import RepositoryLock

    with RepositoryLock(LocalRemote(repo_dir), "shared", "backup of web01"):
        run = cli("gc", "--remote", str(repo_dir), ok=False)
    assert "busy" in run.err and "backup of web01" in run.err
    cli("gc", "--remote", str(repo_dir))


def test_prune_dry_run_then_prune(cli: Cli, make_vm: Callable[..., Path], repo_dir: Path) -> None:
    vm = make_vm()
    points = [
        cli("backup", str(vm), "--remote", str(repo_dir), "--mode", "delta", "--json").json()[
            "restore_point"
        ]
        for _ in range(4)
    ]
    dry = cli("prune", "--remote", str(repo_dir), "--keep-last", "2", "--dry-run", "--json").json()
    assert sorted(dry["removed"]) == sorted(points[:2])
    assert len(cli("list", "--remote", str(repo_dir), "--json").json()["restore_points"]) == 4
    cli("prune", "--remote", str(repo_dir), "--keep-last", "2")
    left = cli("list", "--remote", str(repo_dir), "--json").json()["restore_points"]
    assert sorted(p["restore_point"] for p in left) == sorted(points[2:])
    empty = cli("prune", "--remote", str(repo_dir), ok=False)
    assert "empty policy" in empty.err or "no retention" in empty.err


def test_remote_add_list_test(cli: Cli, tmp_path: Path) -> None:
    cli("remote", "add", "r1", str(tmp_path / "r1"))
    assert cli("remote", "list", "--json").json() == [
        {"name": "r1", "location": str(tmp_path / "r1")}
    ]
    report = cli("remote", "test", "r1", "--size", "8", "--json").json()
    assert report["ok"] and report["write_mb_per_s"] > 0 and report["read_mb_per_s"] > 0
    assert set(report["checks"]) >= {"create", "read", "list", "delete", "create-if-absent"}
    files = [p.name for p in (tmp_path / "r1").rglob("*") if p.is_file()]
    assert files == ["config"]  # the probe cleaned up after itself
    cli("remote", "add", "r1", str(tmp_path / "x"), ok=False)


def test_an_empty_point_id_selects_nothing(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    """`vmkeep forget "$POINT"` with POINT unset: an empty id is a prefix of every id, and with
    one restore point it used to delete (or restore, export, verify) exactly that point."""
    point = cli("backup", str(make_vm()), "--remote", str(repo_dir), "--json").json()
    for args in (
        ("forget", ""),
        ("restore", " ", "--to", str(tmp_path / "out")),
        ("verify", ""),
    ):
        run = cli(*args, "--remote", str(repo_dir), ok=False)
        assert "restore point id is empty" in run.err, run.err
    listing = cli("list", "--remote", str(repo_dir), "--json").json()["restore_points"]
    assert [p["restore_point"] for p in listing] == [point["restore_point"]]
    assert not (tmp_path / "out").exists()
