"""Bad input and faults: one clear line, non-zero exit, nothing lost, no partial restore point."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import VMKEEP, Cli, disk_hashes


def random_vm(parent: Path, name: str, size: int, seed: int) -> Path:
    """A VM whose disk is mostly random data: every chunk is new, so writes take time."""
    vm = parent / name
    vm.mkdir(parents=True)
    rng = random.Random(seed)
    with open(vm / "disk0.img", "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 1 << 20):
            if rng.random() < 0.8:
                f.seek(offset)
                f.write(rng.randbytes(1 << 20))
    (vm / "vm.json").write_text(
        json.dumps(
            {
                "name": name,
                "uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "vcpus": 1,
                "memory_mib": 512,
                "metadata": {},
                "disks": [{"name": "disk0", "file": "disk0.img", "format": "raw"}],
            }
        )
    )
    return vm


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs ({res.stderr.strip()}): these tests need root")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_wrong_passphrase_touches_nothing(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path
) -> None:
    vm = make_vm()
    cli("backup", str(vm), "--remote", str(repo_dir))
    before = {p: p.stat().st_mtime_ns for p in repo_dir.rglob("*")}
    for args in (["backup", str(vm)], ["list"], ["gc"], ["verify"]):
        run = cli(*args, "--remote", str(repo_dir), ok=False, env={"VMKEEP_PASSPHRASE": "nope"})
        assert "wrong passphrase" in run.err
    assert {p: p.stat().st_mtime_ns for p in repo_dir.rglob("*")} == before


def test_passphrase_file_and_missing_passphrase(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "pw").write_text("e2e passphrase\n")
    env = dict(cli.env)
    env.pop("VMKEEP_PASSPHRASE")
    res = subprocess.run(
        [
            VMKEEP,
            "--passphrase-file",
            str(tmp_path / "pw"),
            "list",
            "--remote",
            str(repo_dir),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        [VMKEEP, "list", "--remote", str(repo_dir)],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode != 0 and "VMKEEP_PASSPHRASE" in res.stderr


def test_unknown_vm_point_disk_and_remote(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    cli("backup", str(tmp_path / "no-such-vm"), "--remote", str(repo_dir), ok=False)
    cli("restore", "19990101", "--remote", str(repo_dir), "--to", str(tmp_path), ok=False)
    cli("list", "--remote", str(tmp_path / "not-a-repo"), ok=False)
    cli("list", "--remote", "nosuchname", ok=False)
    cli("backup", str(make_vm()), "--remote", str(repo_dir), "--mode", "weekly", ok=False)
    point = cli("backup", str(make_vm("x")), "--remote", str(repo_dir), "--json").json()[
        "restore_point"
    ]
    cli("export", point, "nodisk", str(tmp_path / "o.img"), "--remote", str(repo_dir), ok=False)
    assert not (tmp_path / "o.img").exists()


def test_unreadable_images(cli: Cli, repo_dir: Path, tmp_path: Path) -> None:
    vm = random_vm(tmp_path, "broken", 8 << 20, 1)
    (vm / "disk0.img").unlink()
    (vm / "disk0.img").mkdir()
    run = cli("backup", str(vm), "--remote", str(repo_dir), ok=False)
    assert "disk0.img" in run.err
    (vm / "disk0.img").rmdir()
    (vm / "disk0.img").write_bytes(b"QFI\xfb" + os.urandom(500))  # garbage qcow2
    doc = json.loads((vm / "vm.json").read_text())
    doc["disks"][0]["format"] = "qcow2"
    (vm / "vm.json").write_text(json.dumps(doc))
    cli("backup", str(vm), "--remote", str(repo_dir), ok=False)
    (vm / "vm.json").write_text("{not json")
    cli("backup", str(vm), "--remote", str(repo_dir), ok=False)
    assert cli("list", "--remote", str(repo_dir), "--json").json()["restore_points"] == []


def test_full_remote_and_full_restore_target(
    cli: Cli, tmp_path: Path, tmpfs: Callable[[str], Path]
) -> None:
    small = tmpfs("24m")
    cli("init", str(small / "repo"))
    vm = random_vm(tmp_path, "big", 64 << 20, 2)
    run = cli("backup", str(vm), "--remote", str(small / "repo"), ok=False)
    assert "no space" in run.err
    assert cli("list", "--remote", str(small / "repo"), "--json").json()["restore_points"] == []
    assert cli("verify", "--remote", str(small / "repo"), "--json").json()["ok"]
    cli("gc", "--remote", str(small / "repo"))
    assert not [p for p in (small / "repo").rglob(".tmp-*")]

    repo = tmp_path / "repo"
    cli("init", str(repo))
    point = cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"]
    target = tmpfs("16m")
    run = cli("restore", point, "--remote", str(repo), "--to", str(target), ok=False)
    assert "space" in run.err
    assert os.listdir(target) == []  # the half-written VM was removed


def test_read_only_remote(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path, tmpfs: Callable[[str], Path]
) -> None:
    ro = tmpfs("16m")
    cli("init", str(ro / "repo"))
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    run = cli("backup", str(make_vm()), "--remote", str(ro / "repo"), ok=False)
    assert "read-only" in run.err


def test_kill_9_at_random_instants(cli: Cli, tmp_path: Path) -> None:
    """Chunk objects (format 1); format 3: test_format3.py's killed-between-packs test."""
    repo = tmp_path / "repo"
    cli("init", str(repo), "--format", "1")
    vm = random_vm(tmp_path, "victim", 96 << 20, 3)
    cli("backup", str(vm), "--remote", str(repo))
    rng = random.Random(1234)
    disk = vm / "disk0.img"

    def chunk_objects() -> int:  # stored chunks and chunks being written
        return sum(1 for p in (repo / "chunks").rglob("*") if p.is_file())

    def change() -> None:  # new data, so every run has chunks to write
        with open(disk, "r+b") as f:
            f.seek(rng.randrange(0, 80) << 20)
            f.write(rng.randbytes(8 << 20))

    change()
    began = time.monotonic()
    cli("backup", str(vm), "--remote", str(repo))
    duration = time.monotonic() - began  # of a run like the ones we kill
    kills = runs = 0
    while kills < 20 and runs < 60:
        runs += 1
        change()
        proc = subprocess.Popen(
            [VMKEEP, "backup", str(vm), "--remote", str(repo)],
            env=cli.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        if runs % 2:  # half the kills land anywhere, start-up included
            time.sleep(rng.uniform(0.02, duration))
        else:  # the other half while chunks are being written
            before = chunk_objects()
            while proc.poll() is None and chunk_objects() == before:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, duration / 4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        listed = cli("list", "--remote", str(repo), "--json").json()
        assert listed["unreadable"] == [], f"run {runs} left a broken manifest"
    assert kills >= 20, f"only {kills} runs were killed mid-way"
    assert cli("verify", "--remote", str(repo), "--json").json()["ok"]
    expected = disk_hashes(vm)
    point = cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"]
    from vmkeep.remotes.local import LocalRemote
    from vmkeep.repository.repository import Repository

    opened = Repository.open(LocalRemote(repo), lambda: cli.env["VMKEEP_PASSPHRASE"].encode())
    referenced: set[bytes] = set()
    for m in opened.load_manifests()[0]:
        referenced |= m.referenced_ids()
    leftovers = {cid for cid, _ in opened.list_chunks()} - referenced
    temp_files = list(repo.rglob(".tmp-*"))
    report = cli("gc", "--remote", str(repo), "--json").json()
    assert report["chunks_deleted"] == len(leftovers)
    assert report["partial_objects_removed"] == len(temp_files)
    assert leftovers or temp_files, "no kill left anything behind: the test did not bite"
    assert not list(repo.rglob(".tmp-*")) and not list((repo / "locks").iterdir())
    assert {cid for cid, _ in opened.list_chunks()} == referenced  # nothing else is left
    out = cli("restore", point, "--remote", str(repo), "--to", str(tmp_path / "r"), "--json").json()
    assert disk_hashes(Path(out["location"])) == expected


def test_one_backup_per_vm_across_installations(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli("init", str(repo))
    big = random_vm(tmp_path, "big", 256 << 20, 4)
    other = random_vm(tmp_path, "other", 8 << 20, 5)
    second_install = Cli(tmp_path / "second-installation")
    first = subprocess.Popen(
        [VMKEEP, "backup", str(big), "--remote", str(repo)],
        env=cli.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    lock_doc: dict[str, object] = {}
    while not lock_doc and time.monotonic() < deadline:
        for path in (repo / "locks").glob("shared-*") if (repo / "locks").exists() else []:
            lock_doc = json.loads(path.read_text())
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # frozen while it holds its lock: no race with its end
    assert lock_doc and str(lock_doc["scope"]).startswith("vm-")
    assert "big" not in json.dumps(lock_doc)  # the lock does not name the VM
    began = time.monotonic()
    run = second_install("backup", str(big), "--remote", str(repo), ok=False)
    assert time.monotonic() - began < 10 and first.poll() is None
    assert "big is already being backed up" in run.err and f"pid {first.pid}" in run.err
    assert "taken over after 20" in run.err and len(run.err.strip().splitlines()) == 1, run.err
    second_install("backup", str(other), "--remote", str(repo))  # another VM: no conflict
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read() if first.stderr else ""
    # a holder on another host that stopped refreshing is taken over once its lease expires
    stale = dict(lock_doc, host="another-host", pid=1, refreshed=time.time() - 3600)
    (repo / "locks" / "shared-deadbeef").write_text(json.dumps(stale))
    fresh = dict(stale, refreshed=time.time())
    (repo / "locks" / "shared-cafe").write_text(json.dumps(fresh))
    run = second_install("backup", str(big), "--remote", str(repo), ok=False)
    assert "another-host" in run.err
    (repo / "locks" / "shared-cafe").unlink()
    second_install("backup", str(big), "--remote", str(repo))


def test_backup_that_cannot_fit_fails_before_it_starts(
    cli: Cli, tmp_path: Path, tmpfs: Callable[[str], Path]
) -> None:
    tiny = tmpfs("4m")
    cli("init", str(tiny / "repo"))
    vm = random_vm(tmp_path, "big", 64 << 20, 6)  # ~51 MiB of data: a tenth does not fit
    began = time.monotonic()
    run = cli("backup", str(vm), "--remote", str(tiny / "repo"), ok=False)
    assert "needs at least" in run.err and time.monotonic() - began < 10
    assert not [p for p in (tiny / "repo").rglob("*") if p.is_file() and p.name != "config"]


def test_small_delta_fits_where_a_second_full_copy_would_not(
    cli: Cli, tmp_path: Path, tmpfs: Callable[[str], Path]
) -> None:
    """A delta is not asked for the full's size: after a ~22 MiB full, 40 MiB of remote has less
    than that left, but room for a 1 MiB change (the check used the oldest run's size)."""
    repo = tmpfs("40m") / "repo"
    cli("init", str(repo))
    vm = random_vm(tmp_path, "tight", 32 << 20, 6)
    full = cli("backup", str(vm), "--remote", str(repo), "--json").json()
    (listed,) = cli("list", "--remote", str(repo), "--json").json()["restore_points"]
    assert listed["restore_point"] == full["restore_point"]
    assert shutil.disk_usage(repo).free < listed["new_bytes_written"]
    with open(vm / "disk0.img", "r+b") as f:
        f.seek(5 << 20)
        f.write(os.urandom(1 << 20))
    point = cli("backup", str(vm), "--remote", str(repo), "--json").json()
    cli("restore", point["restore_point"], "--remote", str(repo), "--to", str(tmp_path / "back"))
    assert disk_hashes(tmp_path / "back" / "tight") == disk_hashes(vm)
