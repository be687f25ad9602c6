"""What a SIGKILLed restore leaves (issue 13 item 7; docs/CONNECTOR-FILES.md §4): the hidden
build directory of a new VM is removed by the next restore to that target once its owner is
provably dead; a VM whose in-place restore was killed is marked incomplete, listed so, refused
by backup, and cleared by a restore in place that completes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.e2e.conftest import VMKEEP
from tests.stored_data import data_objects
from vmkeep.connectors.files.demo import modify_demo_vm
from vmkeep.connectors.files.leftovers import owner_record

from .conftest import Cli, refused, sha256, tree

PYTHON = str(Path(VMKEEP).with_name("python"))
TIMEOUT = 120

# The restore stops for good after its first disk write, having said so: the test kills it
# there, a point where the target holds a half-written disk.
PAUSE_AFTER_FIRST_WRITE = """
import os, sys, time
from pathlib import Path
import vmkeep.operations.restore as restore
write_pieces = restore.write_pieces
def pausing(writer, offset, pieces):
    written = write_pieces(writer, offset, pieces)
    Path(os.environ["READY_FILE"]).touch()
    time.sleep(600)
    return written
restore.write_pieces = pausing
from vmkeep.interfaces.cli.app import main
sys.argv = ["vmkeep", *sys.argv[1:]]
main()
"""


def _kill_mid_restore(cli: Cli, tmp_path: Path, *args: str) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [PYTHON, "-c", PAUSE_AFTER_FIRST_WRITE, "restore", *args],
        env=dict(cli.env, READY_FILE=str(ready)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the restore never wrote"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    ready.unlink()


def test_killed_restore_leaves_a_build_directory_that_the_next_restore_removes(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    vm = make_vm()
    point = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    target = tmp_path / "target"
    target.mkdir()
    _kill_mid_restore(cli, tmp_path, point, "--remote", str(repo_dir), "--to", str(target))
    leftovers = [p for p in target.iterdir() if p.name.startswith(".vmkeep-new-")]
    assert len(leftovers) == 1 and (leftovers[0] / ".vmkeep-owner").is_file()
    assert not (target / "web01").exists()

    run = cli("restore", point, "--remote", str(repo_dir), "--to", str(target), "--json")
    assert "removed" in run.err and leftovers[0].name in run.err
    assert sorted(p.name for p in target.iterdir()) == ["web01"]
    assert sha256(target / "web01" / "disk0.raw") == sha256(vm / "disk0.raw")
    assert not (target / "web01" / ".vmkeep-owner").exists()


def test_build_directories_of_live_or_unknown_owners_are_left_alone(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    point = cli("backup", str(make_vm()), "--remote", str(repo_dir), "--json").json()[
        "restore_point"
    ]
    target = tmp_path / "target"
    alive = target / ".vmkeep-new-a-1-000000000000"  # this test process: alive
    elsewhere = target / ".vmkeep-new-b-1-111111111111"  # another host: cannot be judged
    for path, record in ((alive, owner_record()), (elsewhere, dict(owner_record(), host="x"))):
        path.mkdir(parents=True)
        (path / ".vmkeep-owner").write_text(json.dumps(record))
        (path / "disk0.raw").write_bytes(b"in progress")
    before = tree(target)
    run = cli("restore", point, "--remote", str(repo_dir), "--to", str(target))
    assert str(elsewhere) in run.err and str(alive) not in run.err
    after = tree(target)
    assert {k: v for k, v in after.items() if k in before} == before
    assert {k.split("/")[0] for k in set(after) - set(before)} == {"web01"}


def test_killed_in_place_restore_marks_the_vm_incomplete_until_one_completes(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    vm = make_vm()
    original = sha256(vm / "disk0.raw")
    point = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    modify_demo_vm(vm, 5)
    assert sha256(vm / "disk0.raw") != original
    args = (point, "--remote", str(repo_dir), "--to", str(vm), "--in-place")
    _kill_mid_restore(cli, tmp_path, *args)
    assert (vm / "vm.json.incomplete").is_file()

    listed = cli("vm", "list", str(vm.parent), "--json", timeout=TIMEOUT).json()
    assert "did not finish" in listed[0]["incomplete"]
    table = cli("vm", "list", str(vm.parent), timeout=TIMEOUT).out
    assert "INCOMPLETE" in table

    points = cli("list", "--remote", str(repo_dir), "--json").json()["restore_points"]
    run = cli("backup", str(vm), "--remote", str(repo_dir), ok=False, timeout=TIMEOUT)
    assert "refusing to back up" in refused(run) and "in-place restore" in run.err
    assert cli("list", "--remote", str(repo_dir), "--json").json()["restore_points"] == points

    cli(*("restore", *args), timeout=TIMEOUT)
    assert not (vm / "vm.json.incomplete").exists()
    assert sha256(vm / "disk0.raw") == original
    assert cli("vm", "list", str(vm.parent), "--json").json()[0]["incomplete"] is None
    cli("backup", str(vm), "--remote", str(repo_dir), timeout=TIMEOUT)


def test_a_failed_in_place_restore_of_an_untouched_vm_leaves_no_mark(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path
) -> None:
    """A qcow2 in-place restore writes a copy, so when it fails the VM is what it was."""
    vm = make_vm(fmt="qcow2")
    point = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    for chunk in data_objects(repo_dir):  # chunk objects, or packs
        chunk.write_bytes(b"corrupt")
    modify_demo_vm(vm, 2)  # so that some chunk must be fetched
    before = tree(vm)
    args = ("restore", point, "--remote", str(repo_dir), "--to", str(vm), "--in-place")
    run = cli(*args, ok=False, timeout=TIMEOUT)
    refused(run)
    assert tree(vm) == before


def test_killed_in_place_restore_of_a_qcow2_disk_leaves_a_copy_the_next_one_removes(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    vm = make_vm(fmt="qcow2")
    point = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    modify_demo_vm(vm, 4)
    args = (point, "--remote", str(repo_dir), "--to", str(vm), "--in-place")
    _kill_mid_restore(cli, tmp_path, *args)
    copies = [p.name for p in vm.iterdir() if p.name.startswith(".disk0.qcow2.")]
    assert len(copies) == 1 and (vm / "vm.json.incomplete").is_file()

    run = cli(*("restore", *args), timeout=TIMEOUT)
    assert copies[0] in run.err
    assert sorted(p.name for p in vm.iterdir()) == ["disk0.qcow2", "vm.json"]


def test_in_place_restore_refuses_while_another_one_runs(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path
) -> None:
    vm = make_vm()
    point = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    (vm / "vm.json.incomplete").write_text(json.dumps(owner_record()))  # alive: this process
    before = tree(vm)
    args = ("restore", point, "--remote", str(repo_dir), "--to", str(vm), "--in-place")
    run = cli(*args, ok=False, timeout=TIMEOUT)
    assert "is running" in refused(run)
    assert tree(vm) == before
