"""A small process that thaws a guest's file systems when vmkeep dies while they may be frozen.

qemu-ga on Linux has no freeze timeout: a guest frozen by a vmkeep that is then killed (the OOM
killer, `kill -9`, a lost session) stays frozen, every write of its applications blocked, until
someone runs `virsh domfsthaw`. So before it asks for a freeze, vmkeep starts this guard with a
pipe on its stdin; vmkeep `release`s it once the guest is thawed (or was never frozen). When the
pipe closes without that word, vmkeep is gone: the guard connects to the same libvirt URI and
thaws, trying again for `window` seconds (a freeze the agent was still working on may land after
vmkeep died). It runs in its own session, so a Ctrl-C or a kill of vmkeep's process group does
not take it along, and it is run as a script: it imports only the standard library and libvirt.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
from typing import Any

RELEASED = b"released"


class ThawGuard:
    """The parent's end: start before the freeze, `release` when the guest is not frozen."""

    def __init__(self, uri: str, domain_uuid: str, window: float) -> None:
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), uri, domain_uuid, str(window)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )

    def release(self) -> None:
        """The guest is thawed (or was never frozen): the guard exits without doing anything.
        Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.write(RELEASED)
            proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def abandon(self) -> None:
        """vmkeep leaves while a freeze may still land: the guard takes over at once (the same
        as vmkeep dying), and goes on after vmkeep exits. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()


def _libvirt() -> Any:
    """The bindings, loaded only when there is something to thaw (bindings.py is not used:
    importing the vmkeep package would slow down every guard's start)."""
    mod = importlib.import_module("libvirt")
    mod.registerErrorHandler(lambda _ctx, _err: None, None)
    return mod


def _thaw(uri: str, domain_uuid: str, window: float) -> int:
    libvirt = _libvirt()
    deadline = time.monotonic() + window
    pause = 1.0
    while True:
        try:
            conn = libvirt.open(uri)
            try:
                dom = conn.lookupByUUIDString(domain_uuid)
                # vmkeep may have put libvirt's default (wait for ever) back: bound each try.
                with contextlib.suppress(libvirt.libvirtError, AttributeError):
                    dom.agentSetResponseTimeout(max(1, round(window)), 0)
                if dom.fsThaw(None, 0) > 0:
                    print(
                        f"vmkeep: the backup of domain {dom.name()} ended while its file systems "
                        "were frozen: thawed them",
                        file=sys.stderr,
                    )
                    return 0
            finally:
                conn.close()
        except libvirt.libvirtError:
            pass  # no agent answer yet, libvirtd restarting...: try again until the deadline
        if time.monotonic() + pause > deadline:
            return 0
        time.sleep(pause)
        pause = min(pause * 2, 10.0)


def _restore_agent_timeout(uri: str, domain_uuid: str) -> None:
    """vmkeep bounded libvirt's wait for the agent during the freeze and would have put the
    default back at its end (guest_freeze.py)."""
    libvirt = _libvirt()
    with contextlib.suppress(libvirt.libvirtError, AttributeError):
        conn = libvirt.open(uri)
        try:
            dom = conn.lookupByUUIDString(domain_uuid)
            dom.agentSetResponseTimeout(libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT, 0)
        finally:
            conn.close()


def main(argv: list[str]) -> int:
    uri, domain_uuid, window = argv[0], argv[1], float(argv[2])
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # only vmkeep's pipe decides
    word = sys.stdin.buffer.read()
    if word == RELEASED:
        return 0
    try:
        return _thaw(uri, domain_uuid, window)
    finally:
        _restore_agent_timeout(uri, domain_uuid)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
