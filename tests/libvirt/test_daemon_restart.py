"""libvirtd restarted or stopped around and during live backups (real daemon, real QEMU).

- restarted between a full and a delta: the delta is still incremental and hash-correct;
- restarted in the middle of a backup: QEMU, the job and its NBD export survive; the run
  reconnects, completes, ends the job and leaves nothing behind;
- not running when a backup starts: one-line error, nothing listed; the next backup works;
- stopped in the middle and still down when the run ends: the data already read is complete
  (the NBD export does not need libvirtd), so the point is saved; the job cannot be ended
  without libvirtd, so the run directory is left marked for the next backup, which ends the job
  and still builds an incremental on the saved point.

Restarting libvirtd breaks every other client's connection, including other test runs on this
machine: each restart waits for a moment when no other pytest run that may use libvirt (one
naming tests/libvirt, or a whole-suite run) is active and no other live process has throw-away
domains; after 180 s without one, the module's restart tests skip with the reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Cli
from tests.libvirt import libvirt_env as lv
from tests.libvirt.backup_points import (
    FaultAfterFirstChunk,
    backup,
    dirty_chunks,
    models,
    new_repo,
    point_ids,
    restored_hashes,
    vmkeep_checkpoints,
)
from tests.libvirt.conftest import LibvirtEnv
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.backup.workdir import MARKER
from vmkeep.connectors.libvirt.connection import Connection

MiB = lv.MiB
QUIET_WAIT = 180.0


@pytest.fixture(autouse=True)
def restartable() -> None:
    why = lv.libvirtd_restartable()
    if why:
        pytest.skip(f"libvirtd cannot be restarted here: {why}")


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def other_libvirt_tests() -> list[str]:
    """Other pytest runs that may use libvirtd (theirs name tests/libvirt, or no test path at
    all: a whole-suite run), and other live processes' throw-away domains."""
    out = subprocess.run(["pgrep", "-af", "pytest"], capture_output=True, text=True).stdout
    mine = _ancestors()
    busy = []
    for line in out.splitlines():
        pid, _, cmd = line.partition(" ")
        words = cmd.split()
        runs_pytest = any(w == "pytest" or w.endswith("/pytest") for w in words)
        paths = [w for w in words if w.startswith("tests")]
        if int(pid) not in mine and runs_pytest and (not paths or "tests/libvirt" in cmd):
            busy.append(line)
    conn = lv.wait_for_libvirtd()
    try:
        for dom in conn.listAllDomains():
            owner = dom.name()[len(lv.PREFIX) :].split("-", 1)[0]
            theirs = dom.name().startswith(lv.PREFIX) and owner.isdigit()
            if theirs and int(owner) not in mine and lv._pid_alive(int(owner)):
                busy.append(f"domain {dom.name()}")
    finally:
        conn.close()
    return busy


def wait_for_quiet_window() -> None:
    """Block until no other libvirt test run is active (twice in a row, 1 s apart). After one
    wait in vain, the module's other restart tests skip at once (the suite must stay short)."""
    if _gave_up:
        pytest.skip(f"no quiet window for a libvirtd restart: {_gave_up[0]}")
    deadline = time.monotonic() + QUIET_WAIT
    quiet = 0
    while quiet < 2:
        others = other_libvirt_tests()
        quiet = 0 if others else quiet + 1
        if others and time.monotonic() > deadline:
            _gave_up.append(f"other libvirt users for {QUIET_WAIT:.0f} s: {others[0]}")
            pytest.skip(_gave_up[0])
        time.sleep(1.0)


_gave_up: list[str] = []


def stop_libvirtd() -> None:
    pid = int(lv.LIBVIRTD_PIDFILE.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while lv._pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def start_libvirtd() -> None:
    lv.LIBVIRTD_PIDFILE.unlink(missing_ok=True)
    subprocess.run(["libvirtd", "-d"], check=True)
    lv.wait_for_libvirtd().close()


def reconnect(env: LibvirtEnv, *doms: lv.TestDomain) -> None:
    conn = env.reconnect()
    for d in doms:
        d.reconnect(conn)


def test_delta_after_a_libvirtd_restart(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    connector: LibvirtConnector,
    tmp_path: Path,
) -> None:
    repo = new_repo(tmp_path / "repo")
    d = make_domain((32 * MiB,))
    d.guest_write("vda", 0, os.urandom(5 * MiB))
    full = backup(repo, connector, d, "full")
    full_models = models(d)
    wait_for_quiet_window()
    lv.restart_libvirtd()
    reconnect(libvirt_env, d)
    d.guest_write("vda", 17 * MiB, os.urandom(4096))
    delta = backup(repo, connector, d, "delta")  # the connector's old connection is dead
    assert not any("full read" in n for n in delta.notes), delta.notes
    assert delta.stats.bytes_chunks == dirty_chunks(("vda", 17 * MiB, 4096))
    assert restored_hashes(repo, full.restore_point, tmp_path / "a") == full_models
    assert restored_hashes(repo, delta.restore_point, tmp_path / "b") == models(d)


def test_libvirtd_restarted_mid_backup(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    connector: LibvirtConnector,
    tmp_path: Path,
) -> None:
    repo = new_repo(tmp_path / "repo")
    d = make_domain((64 * MiB,))
    for off in range(0, 60, 12):
        d.guest_write("vda", off * MiB, os.urandom(12 * MiB))
    wait_for_quiet_window()
    progress = FaultAfterFirstChunk(lambda: lv.restart_libvirtd())
    full = backup(repo, connector, d, "full", progress)
    assert progress.advanced == dirty_chunks(("vda", 0, 60 * MiB))
    reconnect(libvirt_env, d)
    assert not lv.job_active(d.dom) and lv.run_dirs(d.dom.UUIDString()) == []
    assert len(vmkeep_checkpoints(d)) == 1
    assert restored_hashes(repo, full.restore_point, tmp_path / "a") == models(d)
    d.guest_write("vda", 62 * MiB, 0x44, 4096)
    delta = backup(repo, connector, d, "delta")
    assert delta.stats.bytes_chunks == dirty_chunks(("vda", 62 * MiB, 4096)), delta.notes
    assert restored_hashes(repo, delta.restore_point, tmp_path / "b") == models(d)


def test_libvirtd_not_running_at_backup_start(
    libvirt_env: LibvirtEnv, make_domain: Callable[..., lv.TestDomain], tmp_path: Path
) -> None:
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    d = make_domain((16 * MiB,))
    d.guest_write("vda", 0, os.urandom(MiB))
    args = ("--connector", "libvirt", "--remote", str(repo), "--json")
    wait_for_quiet_window()
    stop_libvirtd()
    try:
        failed = cli("backup", d.name, *args, ok=False)
    finally:
        start_libvirtd()
    assert "cannot connect to libvirt" in failed.err.strip().splitlines()[-1], failed.err
    reconnect(libvirt_env, d)
    assert cli("list", "--remote", str(repo), "--json").json()["restore_points"] == []
    assert vmkeep_checkpoints(d) == [] and not lv.job_active(d.dom)
    done = cli("backup", d.name, *args).json()
    assert done["bytes_chunks"] == 4 * MiB


def test_libvirtd_stopped_mid_backup_and_still_down_at_its_end(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    connector: LibvirtConnector,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = new_repo(tmp_path / "repo")
    d = make_domain((32 * MiB,))
    d.guest_write("vda", 0, os.urandom(12 * MiB))
    uuid = d.dom.UUIDString()
    # The run waits 30 s for libvirtd to come back; 2 s keeps the daemon's outage short here.
    reconnect_once: Any = Connection.reconnect
    monkeypatch.setattr(Connection, "reconnect", lambda self, timeout=2.0: reconnect_once(self, 2))
    wait_for_quiet_window()
    try:
        point = backup(repo, connector, d, "full", FaultAfterFirstChunk(stop_libvirtd))
    finally:
        start_libvirtd()
    monkeypatch.undo()
    reconnect(libvirt_env, d)
    (left,) = lv.run_dirs(uuid)  # job still running: only libvirtd could end it
    assert lv.job_active(d.dom)
    assert json.loads((left / MARKER).read_text())["checkpoint"] is None  # saved: keep it
    assert point_ids(repo) == [point.restore_point]
    assert restored_hashes(repo, point.restore_point, tmp_path / "a") == models(d)

    d.guest_write("vda", 20 * MiB, 0x19, 4096)
    delta = backup(repo, connector, d, "delta")
    assert not left.exists() and lv.run_dirs(uuid) == [] and not lv.job_active(d.dom)
    assert delta.stats.bytes_chunks == dirty_chunks(("vda", 20 * MiB, 4096)), delta.notes
    assert restored_hashes(repo, delta.restore_point, tmp_path / "b") == models(d)
    assert len(vmkeep_checkpoints(d)) == 1
