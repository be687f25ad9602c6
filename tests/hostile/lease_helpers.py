"""Real processes for the lease-loss tests: a `vmkeep backup` that stops itself (SIGSTOP) at a
chosen point, and a `vmkeep gc` run as if from another host (its own UTS namespace, so its
host name differs and it judges the backup's lock by the lease alone)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import VMKEEP, Cli, Run

WAIT = 60.0  # seconds a stopped backup has to reach its stop point


def needs_other_host() -> None:
    """`unshare --uts` needs root; without it there is no honest second host name."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to run gc under another host name")


@dataclass
class StoppedBackup:
    proc: subprocess.Popen[str]
    flag: Path
    stopped_at: float  # time.monotonic() when it was seen stopped

    def hold(self, seconds: float) -> None:
        """Return once it has been stopped `seconds`: its lock is then at least that old,
        whatever the load on the machine (it refreshed last before it stopped)."""
        time.sleep(max(0.0, self.stopped_at + seconds - time.monotonic()))

    def resume(self, paused_at_least: float = 0, timeout: float = 120) -> Run:
        """SIGCONT once it has been stopped `paused_at_least` seconds; its exit and output."""
        self.hold(paused_at_least)
        os.kill(self.proc.pid, signal.SIGCONT)
        out, err = self.proc.communicate(timeout=timeout)
        assert "Traceback" not in err, err
        return Run(self.proc.returncode, out, err)


def start_stopped_backup(
    cli: Cli, vm: Path, remote: str, stage: str, lease: float, flag: Path
) -> StoppedBackup:
    """Start `vmkeep backup` and return once it has stopped itself at `stage`."""
    env = dict(
        cli.env,
        VMKEEP_TEST_STOP=f"{stage}:{flag}",
        VMKEEP_LOCK_LEASE_SECONDS=str(lease),
    )
    proc = subprocess.Popen(
        [VMKEEP, "backup", str(vm), "--remote", remote, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + WAIT
    while not (flag.exists() and _state(proc.pid) == "T"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"backup did not stop at {stage}: exit {proc.returncode} {err} {out}")
        time.sleep(0.02)
    return StoppedBackup(proc, flag, time.monotonic())


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def gc_from(cli: Cli, remote: str, lease: float, host: str = "other-gc-host") -> Run:
    """`vmkeep gc` with its own lease, under host name `host` (another host's view)."""
    env = dict(cli.env, VMKEEP_LOCK_LEASE_SECONDS=str(lease))
    as_other_host = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host]
    proc = subprocess.run(
        [*as_other_host, VMKEEP, "gc", "--remote", remote, "--json"],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return Run(proc.returncode, proc.stdout, proc.stderr)


def assert_clean_failure(run: Run, *words: str) -> None:
    """Non-zero, not the internal-error exit, exactly one `error:` line naming `words`."""
    lines = [line for line in run.err.strip().splitlines() if line.strip()]
    assert run.code not in (0, 70), (run.code, run.err)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], run.err
    for word in words:
        assert word in errors[0], errors[0]
