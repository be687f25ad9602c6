"""A read-only NBD export of a shut-off domain's disk image by `qemu-nbd`, with a persistent
dirty bitmap of the image offered as the `qemu:dirty-bitmap:<name>` meta context: the offline
counterpart of a live pull-mode job's export (LIBVIRT-NOTES §7). The export name is "".

qemu-nbd holds a shared lock on the image while it runs, so the domain cannot be started in the
middle of the read (libvirt fails with "Failed to get write lock"). It is told to die with its
parent (PR_SET_PDEATHSIG), so a killed vmkeep leaves no server holding the image."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from vmkeep.errors import ConnectorError
from vmkeep.libc import LIBC

START_TIMEOUT = 15.0
PR_SET_PDEATHSIG = 1


# vmkeep.libc loads the C library in the parent: a dlopen in the child between fork and exec
# can fail (another thread may have held the loader's lock at fork time), and then the death
# signal was lost.


def _die_with_parent(parent: int) -> Callable[[], None]:
    """Runs in the child between fork and exec: SIGTERM when the parent dies, and if it died
    already (before the prctl), exit at once."""

    def preexec() -> None:
        if LIBC is not None:
            LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class QemuNbdExport:
    """`qemu-nbd -r` serving `image` on a unix socket until `stop`."""

    def __init__(
        self, image: str, socket: Path, *, fmt: str = "qcow2", bitmap: str | None, clients: int = 8
    ) -> None:
        self.image = image
        self.socket = socket
        cmd = ["qemu-nbd", "--read-only", "--persistent", f"--shared={clients}"]
        cmd += ["--format", fmt, "--socket", str(socket), "--cache=none", "--aio=threads"]
        if bitmap:
            cmd += ["--bitmap", bitmap]
        try:
            self._proc = subprocess.Popen(
                [*cmd, image],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        except OSError as exc:
            raise ConnectorError(f"cannot run qemu-nbd for {image}: {exc.strerror}") from None
        try:
            self._wait_for_socket()
        except BaseException:
            self.stop()
            raise

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise ConnectorError(
                    f"qemu-nbd could not export {self.image}: "
                    + (" ".join(err.split()) or f"exit status {self._proc.returncode}")
                )
            if time.monotonic() > deadline:
                raise ConnectorError(f"qemu-nbd did not start serving {self.image} in time")
            time.sleep(0.02)

    def stop(self) -> None:
        """Terminate the server and wait for it (it releases the image lock on exit)."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        if self._proc.stderr:
            self._proc.stderr.close()
        self.socket.unlink(missing_ok=True)
