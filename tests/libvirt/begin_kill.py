"""Killing a vmkeep run while libvirtd is inside its virDomainBackupBegin: the instant at which
deleting the run's half-made checkpoint crashes libvirtd 9.0 (job_settle.py). QEMU is stopped
once the new checkpoint is listed but the job is not set up yet, which holds libvirt there;
the window is a few milliseconds wide, so a try that misses it is repeated."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from vmkeep.connectors.libvirt.cleanup.job_settle import job_starting

TRIES = 5


def qemu_pid(domain_name: str) -> int:
    return int((Path("/run/libvirt/qemu") / f"{domain_name}.pid").read_text().strip())


def _one_try(argv: list[str], env: dict[str, str], dom: Any, listed: Callable[[], bool]) -> bool:
    qemu = qemu_pid(dom.name())
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (job_starting(dom) and listed()):
        assert child.poll() is None and time.monotonic() < deadline, "no backupBegin seen"
        time.sleep(0.002)
    os.kill(qemu, signal.SIGSTOP)
    held = job_starting(dom)
    child.kill()
    assert child.wait() == -signal.SIGKILL
    if not held:  # backupBegin finished first: an ordinary killed run, QEMU runs again
        os.kill(qemu, signal.SIGCONT)
    return held


@contextmanager
def killed_inside_backup_begin(
    argv: list[str], env: dict[str, str], dom: Any, listed: Callable[[], bool]
) -> Iterator[None]:
    """Run `argv` and SIGKILL it inside backupBegin (`listed`: its new checkpoint is listed),
    trying up to TRIES times; the body runs with QEMU stopped, and QEMU resumes 3 s into it
    (so the body's run meets libvirt still busy) and in any case on exit."""
    import threading

    qemu = qemu_pid(dom.name())
    resumed = threading.Timer(3.0, os.kill, (qemu, signal.SIGCONT))
    try:
        if not any(_one_try(argv, env, dom, listed) for _ in range(TRIES)):
            pytest.fail(f"could not stop QEMU inside backupBegin in {TRIES} tries")
        resumed.start()
        yield
    finally:
        resumed.cancel()
        os.kill(qemu, signal.SIGCONT)
