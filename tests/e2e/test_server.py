"""A real `vmkeep server` process: SIGKILL mid-run, restart, the run interrupted and its locks
gone, the next run succeeds, every point restores hash-equal; SIGTERM stops it cleanly.

Schedules are per minute; the server's hidden `--clock-rate 20` makes a schedule minute last 3
real seconds (docs/SERVER.md "Testing"). Needs the job runner (engine/runs) and the job CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmkeep.engine.state import Ledger, RunView, StateDB
from vmkeep.remotes.local import TEMP_PREFIX

from .conftest import VMKEEP, Cli, disk_hashes

RATE = "20"  # schedule minutes pass 20 times faster: one `* * * * *` fire every 3 s
VMS = 4
VM_SIZE = 64 * 1024 * 1024

JOB = """\
kind: backup
name: e2e-server
mode: delta
remotes: [left, right]
connector: {{type: files, root: {root}}}
vms: ["*"]
concurrency: {{vms: 2}}
prune: false
schedules:
  - {{name: fast, cron: "* * * * *", keep: 1000, overlap: skip, missed: skip}}
"""


def wait_for(what: str, check: Callable[[], object], timeout: float = 90) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def lock_pids(repo: Path) -> list[int]:
    """The pids of the locks in `repo`. A `.tmp-` file is not a lock (no listing shows it:
    remotes/local.py): a server killed while it refreshed its lock can leave the temporary
    copy, whole, before its rename; a gc's purge removes it later."""
    locks = repo / "locks"
    if not locks.is_dir():
        return []
    pids = []
    for path in locks.iterdir():
        if path.name.startswith(TEMP_PREFIX):
            continue
        try:
            pids.append(int(json.loads(path.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            continue  # being written or removed right now
    return pids


class Server:
    def __init__(self, cli: Cli, log: Path) -> None:
        self.cli, self.log = cli, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [VMKEEP, "server", "--tick", "0.2", "--grace", "30", "--clock-rate", RATE],
                env=self.cli.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        return self.proc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def setup(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> Iterator[tuple[Cli, Server, Ledger, dict[str, Path], dict[str, dict[str, str]]]]:
    cli.env["VMKEEP_DATA_DIR"] = str(tmp_path / "data")
    vms = {f"vm{i}": make_vm(f"vm{i}", VM_SIZE) for i in range(VMS)}
    repos = {name: tmp_path / name for name in ("left", "right")}
    for name, repo in repos.items():
        cli("init", str(repo))
        cli("remote", "add", name, str(repo))
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(root=tmp_path / "vms"))
    cli("job", "apply", "-f", str(job))
    db = StateDB.open(tmp_path / "data")
    server = Server(cli, tmp_path / "server.log")
    try:
        yield cli, server, Ledger(db), repos, {n: disk_hashes(p) for n, p in vms.items()}
    finally:
        server.stop()
        db.close()


def runs(ledger: Ledger) -> list[RunView]:
    return [r for r in ledger.list_runs(job="e2e-server", limit=500) if r.state != "skipped"]


def test_sigkill_mid_run_then_restart_recovers(
    setup: tuple[Cli, Server, Ledger, dict[str, Path], dict[str, dict[str, str]]],
    tmp_path: Path,
) -> None:
    cli, server, ledger, repos, hashes = setup
    first = server.start()

    def killable() -> RunView | None:  # running, and holding a lock on a remote
        held = any(first.pid in lock_pids(r) for r in repos.values())
        return next((r for r in runs(ledger) if r.state == "running" and held), None)

    victim = wait_for("a run holding a repository lock", killable)
    assert isinstance(victim, RunView)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert ledger.get_run(victim.id).state == "running"  # nobody has put it right yet

    again = server.start()
    wait_for("the killed run marked", lambda: ledger.get_run(victim.id).state == "interrupted")
    wait_for(
        "the dead server's locks released",
        lambda: all(first.pid not in lock_pids(r) for r in repos.values()),
    )
    done = wait_for(
        "a successful run after the restart",
        lambda: [r for r in runs(ledger) if r.id > victim.id and r.state == "success"],
        timeout=180,
    )
    assert done
    assert all(
        t.state == "interrupted" or t.finished is not None for t in ledger.get_run(victim.id).tasks
    )

    again.send_signal(signal.SIGTERM)
    assert again.wait(60) == 0, (tmp_path / "server.log").read_text()[-3000:]
    assert not [r for r in runs(ledger) if r.state in ("queued", "running")]
    for name, repo in repos.items():
        assert again.pid not in lock_pids(repo), name
        points = cli("list", "--remote", str(repo), "--json").json()["restore_points"]
        assert {p["vm"] for p in points} == set(hashes), name
        for point in points:
            point_id = str(point["restore_point"])
            out = tmp_path / "restored" / name / point_id
            args = ("restore", point_id, "--remote", str(repo), "--to", str(out), "--json")
            restored = cli(*args).json()
            assert disk_hashes(Path(restored["location"])) == hashes[str(point["vm"])]


def test_sigterm_stops_cleanly_with_the_run_marked(
    setup: tuple[Cli, Server, Ledger, dict[str, Path], dict[str, dict[str, str]]],
) -> None:
    _cli, server, ledger, repos, _hashes = setup
    proc = server.start()
    wait_for("a running run", lambda: any(r.state == "running" for r in runs(ledger)))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    final = runs(ledger)
    assert final and all(r.state in ("cancelled", "success", "partial") for r in final)
    assert not any(proc.pid in lock_pids(r) for r in repos.values())
    assert os.path.exists(repos["left"])
