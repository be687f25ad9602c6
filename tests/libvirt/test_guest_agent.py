"""Live backups of a REAL Linux guest running the QEMU guest agent (real_guest.py): its ext4 file
system is frozen at the job's start and thawed after, and an agent that is slow, gone or hung
neither hangs the backup nor leaves the guest frozen.

How the freeze is seen: the guest's freeze hook prints `freeze`/`thaw` on its console (the agent
got both requests, in that order), and the restored image's ext4 has no `needs_recovery` flag. A
mounted ext4 keeps that flag set at all times except while frozen (the freeze flushes the
journal and clears it), so only a copy taken while frozen lacks it; a crash-consistent copy of
this busy guest has it (checked in the no-freeze tests). `e2fsck -fn` must find the frozen copy
clean, and a file the guest wrote and synced before the backup must be in it.

One guest is booted for the module (~4 s here under TCG). The hung-agent test runs last: it
leaves the agent stopped.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import VMKEEP, Cli
from tests.libvirt import libvirt_env as lv
from tests.libvirt import real_guest as rg
from tests.libvirt.backup_points import backup, new_repo
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.test_connector import read_image
from vmkeep.connectors.files import FilesConnector
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.backup import guest_freeze
from vmkeep.connectors.libvirt.domxml import has_guest_agent
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.repository.repository import Repository

BOOT_TIMEOUT = 90.0  # measured 3.6 s here; generous for a loaded CI machine
DISK = 64 * lv.MiB


@pytest.fixture(scope="module")
def guest(libvirt_env: LibvirtEnv, lv_timings: dict[str, float]) -> Iterator[rg.RealGuest]:
    try:
        files = rg.guest_files()
    except rg.GuestUnavailable as exc:
        pytest.skip(f"real guest cannot be built here: {exc}")
    g = rg.RealGuest(libvirt_env.conn, libvirt_env.pool, files, DISK)
    try:
        try:
            lv_timings["guest_boot_to_agent"] = g.wait_ready(BOOT_TIMEOUT)
        except TimeoutError as exc:
            pytest.fail(str(exc))
        yield g
    finally:
        g.destroy()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    return new_repo(tmp_path_factory.mktemp("guest-agent") / "repo")


@pytest.fixture(scope="module")
def source(libvirt_env: LibvirtEnv) -> Iterator[LibvirtConnector]:
    c = LibvirtConnector(lv.URI)
    yield c
    c.close()


def restored_image(repo: Repository, point: str, where: Path) -> Path:
    """Restore `point` with the files connector and write its one disk out as a raw image."""
    where.mkdir(parents=True)
    files = FilesConnector(where)
    report = restore_vm(repo, files, point, str(where), SilentProgress())
    vm = files.get_vm(report.location)
    (disk,) = vm.disks
    reader = files.open_disk(vm, disk)
    try:
        raw = where / "vda.raw"
        raw.write_bytes(read_image(reader))
    finally:
        reader.close()
    return raw


def fs_features(raw: Path) -> list[str]:
    out = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        if line.startswith("Filesystem features:"):
            return line.split(":", 1)[1].split()
    raise AssertionError(f"no features in dumpe2fs output: {out.stdout}")


def guest_file(raw: Path, name: str) -> bytes:
    out = subprocess.run(["debugfs", "-R", f"cat /{name}", str(raw)], capture_output=True)
    return out.stdout


def assert_frozen_copy(raw: Path, written: int) -> None:
    """The copy was taken from a frozen ext4, is clean, and holds file `written`."""
    assert "needs_recovery" not in fs_features(raw), "the copy was not taken while frozen"
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert guest_file(raw, "seed.txt") == b"made on the host\n"
    for n in (1, written):
        assert guest_file(raw, f"f{n}") == f"vmkeep guest file {n}\n".encode()


def assert_thawed(g: rg.RealGuest) -> None:
    assert g.agent("guest-fsfreeze-status") == "thawed"
    g.wait_written(3, timeout=15)  # the guest still writes and syncs


def set_hook_delay(g: rg.RealGuest, seconds: int) -> None:
    """The guest's freeze hook sleeps this long before a freeze (0: not at all)."""
    cmd = f"echo {seconds} > /run/hook-delay" if seconds else "rm -f /run/hook-delay"
    g.agent("guest-exec", path="/bin/sh", arg=["-c", cmd])
    time.sleep(0.3)  # guest-exec returns once started


def test_full_backup_freezes_and_thaws(
    guest: rg.RealGuest,
    repo: Repository,
    source: LibvirtConnector,
    tmp_path: Path,
    lv_timings: dict[str, float],
) -> None:
    written = guest.wait_written(2)  # synced before the backup starts
    hooks = len(guest.hooks())
    t0 = time.monotonic()
    report = backup(repo, source, guest, "full")  # type: ignore[arg-type]
    lv_timings["full_backup_with_freeze"] = time.monotonic() - t0
    assert not [n for n in report.notes if "agent" in n or "freeze" in n], report.notes
    assert guest.wait_hooks(hooks + 2)[hooks:] == ["freeze", "thaw"]
    assert_thawed(guest)
    assert_frozen_copy(restored_image(repo, report.restore_point, tmp_path / "r"), written)


def test_delta_backup_freezes_and_thaws(
    guest: rg.RealGuest, repo: Repository, source: LibvirtConnector, tmp_path: Path
) -> None:
    written = guest.wait_written(5)
    hooks = len(guest.hooks())
    report = backup(repo, source, guest, "delta")  # type: ignore[arg-type]
    assert report.mode == "delta"
    assert 0 < report.stats.bytes_read < DISK // 2, report.stats  # really read as a delta
    assert not [n for n in report.notes if "agent" in n or "freeze" in n], report.notes
    assert guest.wait_hooks(hooks + 2)[hooks:] == ["freeze", "thaw"]
    assert_thawed(guest)
    assert_frozen_copy(restored_image(repo, report.restore_point, tmp_path / "r"), written)


def test_slow_freeze_is_given_up_and_thawed_when_it_lands(
    guest: rg.RealGuest,
    repo: Repository,
    source: LibvirtConnector,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A freeze hook that takes longer than the timeout: libvirt would wait for it without
    limit; the backup goes on without the freeze, and the freeze the agent completes later is
    thawed before the backup returns (its end waits up to the timeout once more for that)."""
    monkeypatch.setattr(guest_freeze, "FREEZE_TIMEOUT", 2.0)
    set_hook_delay(guest, 3)  # past the 2 s timeout, within the 2 s more the session's end waits
    try:
        hooks = len(guest.hooks())
        t0 = time.monotonic()
        report = backup(repo, source, guest, "full")  # type: ignore[arg-type]
        took = time.monotonic() - t0
        # Right when the backup returns (no waiting): the late freeze has been thawed.
        status = guest.agent("guest-fsfreeze-status")
    finally:
        set_hook_delay(guest, 0)
    assert any("did not freeze the file systems within 2 s" in n for n in report.notes), (
        report.notes
    )
    assert took < 15, f"backup took {took:.1f} s"
    assert status == "thawed"
    assert guest.wait_hooks(hooks + 2)[hooks:] == ["freeze", "thaw"]
    assert_thawed(guest)
    raw = restored_image(repo, report.restore_point, tmp_path / "r")
    assert "needs_recovery" in fs_features(raw), "a copy not taken while frozen has the flag"


def _guard_of(pid: int) -> int | None:
    """The pid of vmkeep process `pid`'s thaw guard, once started."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        if "thaw_guard.py" in Path(f"/proc/{child}/cmdline").read_text():
            return int(child)
    return None


def test_vmkeep_killed_during_the_freeze_leaves_the_guest_thawed(
    guest: rg.RealGuest, tmp_path: Path
) -> None:
    """qemu-ga has no freeze timeout: a vmkeep SIGKILLed while the agent works on its freeze
    (here a freeze hook taking 4 s) used to leave the guest frozen for good once the freeze
    landed. The thaw guard vmkeep started before the freeze thaws it."""
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    set_hook_delay(guest, 4)
    try:
        hooks = len(guest.hooks())
        argv = [VMKEEP, "backup", guest.name, "--connector", "libvirt", "--remote", str(repo)]
        child = subprocess.Popen(
            argv, env=cli.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while _guard_of(child.pid) is None:
            assert child.poll() is None and time.monotonic() < deadline, "no thaw guard seen"
            time.sleep(0.05)
        time.sleep(1.0)  # vmkeep is waiting for fsFreeze: the hook sleeps 4 s
        child.kill()
        assert child.wait() == -signal.SIGKILL
        # The freeze lands ~3 s later; the guard thaws it and says so on vmkeep's stderr.
        assert guest.wait_hooks(hooks + 2, timeout=30)[hooks:] == ["freeze", "thaw"]
        assert child.stderr is not None
        said = child.stderr.read().decode()  # EOF: the guard, its last holder, is done
        assert "were frozen: thawed them" in said, said
        assert_thawed(guest)
    finally:
        set_hook_delay(guest, 0)
        with contextlib.suppress(Exception):
            guest.agent("guest-fsfreeze-thaw")  # for the next tests, whatever happened


def test_agent_gone_skips_the_freeze(
    guest: rg.RealGuest, repo: Repository, source: LibvirtConnector, tmp_path: Path
) -> None:
    """qemu-ga killed inside the guest (through itself): the channel is disconnected, the
    backup is crash-consistent with a note, and the guest keeps writing."""
    guest.agent("guest-exec", path="/bin/sh", arg=["-c", "kill $(pidof qemu-ga)"])
    deadline = time.monotonic() + 10
    while has_guest_agent(guest.dom.XMLDesc(0)):
        assert time.monotonic() < deadline, "the agent channel stays connected"
        time.sleep(0.05)
    hooks = len(guest.hooks())
    report = backup(repo, source, guest, "full")  # type: ignore[arg-type]
    assert any("no guest agent connected" in n for n in report.notes), report.notes
    assert guest.hooks()[hooks:] == []
    guest.wait_written(3)
    raw = restored_image(repo, report.restore_point, tmp_path / "r")
    assert "needs_recovery" in fs_features(raw), "a copy not taken while frozen has the flag"
    # The guest starts its agent again (real_guest.py): back for the next test.
    guest.wait_ready(30)


def test_hung_agent_does_not_hang_the_backup(
    guest: rg.RealGuest,
    repo: Repository,
    source: LibvirtConnector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """qemu-ga stopped (SIGSTOP, sent through itself): its channel stays connected but nothing
    answers. libvirt's fsFreeze would wait for ever (measured > 290 s) and hold the domain's
    agent job, which blocked the backup's later libvirt calls; vmkeep bounds libvirt's own
    wait (agentSetResponseTimeout, 3 x its freeze timeout), so the backup completes within
    bounded time, says why there was no freeze, and the guest is not frozen. Runs last: the
    agent stays stopped."""
    monkeypatch.setattr(guest_freeze, "FREEZE_TIMEOUT", 2.0)
    guest.agent("guest-exec", path="/bin/sh", arg=["-c", "kill -STOP $(pidof qemu-ga)"])
    time.sleep(0.5)
    assert has_guest_agent(guest.dom.XMLDesc(0)), "a stopped agent keeps its channel"
    t0 = time.monotonic()
    report = backup(repo, source, guest, "full")  # type: ignore[arg-type]
    took = time.monotonic() - t0
    assert any("did not freeze the file systems within 2 s" in n for n in report.notes), (
        report.notes
    )
    assert took < 20, f"backup took {took:.1f} s"
    guest.wait_written(3)  # not frozen
    assert guest.dom.isActive()
