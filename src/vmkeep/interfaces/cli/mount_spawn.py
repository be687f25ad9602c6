"""The process side of `vmkeep mount` and `vmkeep umount`: a mount outlives the command, so
it is served by a `vmkeep mount --foreground` child in its own session. A fresh process, not
a fork: the parent may already run threads (remotes, the point's read-ahead), which a fork
would not carry over. The passphrase, when the repository needs one, goes to the child
through a pipe (never an argument or the environment)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from vmkeep.errors import UsageError, VmkeepError

READY_TIMEOUT = 60.0  # seconds for the child to mount


class MountError(VmkeepError):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code if exit_code not in (0, 70) else 1


def mount_in_background(
    point: str, disk: str, mountpoint: Path, remote: str | None, secret: bytes | None
) -> None:
    """Start the serving child and return once the mount is there, or fail with its error."""
    target = os.path.realpath(mountpoint)
    cmd = [sys.executable, "-c", "from vmkeep.interfaces.cli.app import main; main()"]
    fds: tuple[int, ...] = ()
    if secret is not None:
        read_end, write_end = os.pipe()
        fds = (read_end,)
        cmd += ["--passphrase-file", f"/dev/fd/{read_end}"]
    cmd += ["mount", point, disk, target, "--foreground"]
    cmd += ["--remote", remote] if remote else []
    with tempfile.TemporaryFile() as errors:
        try:
            child = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                pass_fds=fds,
                start_new_session=True,  # the terminal's Ctrl-C must not end the mount
            )
        finally:
            if secret is not None:
                os.close(read_end)
        if secret is not None:
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(secret)
        _wait_mounted(child, target, errors)


def _wait_mounted(child: subprocess.Popen[bytes], target: str, errors: BinaryIO) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not os.path.ismount(target):
        code = child.poll()
        if code is not None:
            raise MountError(_last_error(errors) or f"mounting {target} failed", code)
        if time.monotonic() > deadline:
            child.kill()
            raise VmkeepError(f"mounting {target} took more than {READY_TIMEOUT:.0f} s: gave up")
        time.sleep(0.05)


def _last_error(errors: BinaryIO) -> str:
    """The child's `error:` line (without the prefix), if it printed one."""
    errors.seek(0)
    text = errors.read(1 << 16).decode("utf-8", "replace")
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    return lines[-1][len("error: ") :] if lines else ""


def unmount(mountpoint: Path) -> None:
    """Unmount a vmkeep mount (nothing else): its serving process then exits by itself."""
    from vmkeep.operations.mount import vmkeep_mounts

    target = os.path.realpath(mountpoint)
    if target not in vmkeep_mounts():
        raise UsageError(f"{mountpoint} is not a vmkeep mount")
    run = subprocess.run(
        ["fusermount3", "-u", target], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if run.returncode:
        why = (run.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        raise VmkeepError(f"cannot unmount {mountpoint}: {why.removeprefix('fusermount3: ')}")
