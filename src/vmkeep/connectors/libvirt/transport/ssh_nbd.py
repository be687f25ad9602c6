"""The files of a libvirt host reached through a qemu+ssh:// URI: a disk image opened by a
qemu-nbd started on that host (read-write, or read-only), and file identities (stat) taken there.

Why: incremental replication writes only the dirty blocks into the replica's qcow2 volumes in
place; libvirt's storage API can only upload whole volume files, so over a remote URI the writes
go through QEMU's own NBD server on the target host (the same options as image_nbd.py: QEMU
writes every qcow2 feature and honours the image lock, so a running replica is refused). A
shut-off domain over such a URI is read the same way, read-only (remote_offline.py): QEMU
serves backing chains, and its shared lock keeps the domain from starting during the read.

One ssh process per image, with the options libvirt takes from the URI (`command`, `keyfile`,
`no_verify`; user and port), forwards a local Unix socket to the remote qemu-nbd's socket:

    ssh -L /tmp/vmkeep-nbd-X/s:/tmp/vmkeep-nbd-Y/s host -- sh -c SCRIPT ...

The remote script starts qemu-nbd, says `ready` once its pid file exists (written after the
image is open and exported), then waits on its stdin; end of input (vmkeep closed it, or vmkeep
or ssh died: the ssh runs under `setpriv --pdeathsig KILL`, and sshd closes the session's input
when the connection drops) kills qemu-nbd, waits for it and removes its directory. The local
socket is unlinked as soon as libnbd is connected, so a killed vmkeep leaves nothing here."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from vmkeep.connectors.libvirt.bindings import nbd, nbd_handle, one_line
from vmkeep.connectors.libvirt.replica.record import VolumeStamp
from vmkeep.connectors.libvirt.transport.image_nbd import NbdImage, qemu_nbd_options
from vmkeep.errors import ConnectorError

READY_TIMEOUT = 120.0  # ssh login + qemu-nbd opening the image
EXIT_TIMEOUT = 60.0  # qemu-nbd closing the image after the last write
# $1: the remote directory (must not exist: mkdir refuses a planted one), the rest qemu-nbd's
# options and image. The pid file appears once the export is ready; `done` if qemu-nbd exited
# first (its message went to ssh's stderr). `wait` reaps qemu-nbd: `kill -0` on a --fork'ed
# qemu-nbd saw a zombie for seconds where init reaped slowly.
_SERVE = r"""d=$1; shift
command -v qemu-nbd >/dev/null 2>&1 || {
  echo "qemu-nbd is not installed on this host (Debian: qemu-utils)" >&2; exit 127; }
mkdir -m 700 "$d" || exit 1
trap 'rm -rf "$d"' EXIT
(qemu-nbd --pid-file="$d/pid" -k "$d/s" "$@" </dev/null; : >"$d/done") &
while [ ! -s "$d/pid" ]; do
  [ -e "$d/done" ] && exit 1
  sleep 0.02
done
echo ready
read -r _ || :
kill "$(cat "$d/pid" 2>/dev/null)" 2>/dev/null
wait
"""
# One line per path, in order: size inode mtime ctime (nanoseconds as sec.nsec), or "missing".
_STAT = r"""for p; do stat -L -c '%s %i %.9Y %.9Z' -- "$p" 2>/dev/null || echo missing; done"""


def is_ssh_uri(uri: str) -> bool:
    """A libvirt URI over OpenSSH (driver+ssh://host/...), whose host vmkeep can reach."""
    parts = urlsplit(uri)
    return parts.scheme.endswith("+ssh") and bool(parts.hostname)


@dataclass(frozen=True)
class SshTarget:
    """How to run a command on the host of a qemu+ssh:// URI, as libvirt's ssh transport does."""

    host: str
    port: int | None = None
    user: str | None = None
    keyfile: str | None = None
    command: str = "ssh"  # the ssh client (the URI's `command=`)
    no_verify: bool = False  # accept an unknown host key (the URI's `no_verify=1`)
    control_path: str = ""  # an open connection to share (ssh_master.py)

    @staticmethod
    def from_uri(uri: str) -> SshTarget:
        """The ssh side of a `driver+ssh://[user@]host[:port]/path?params` URI."""
        parts = urlsplit(uri)
        if not is_ssh_uri(uri) or not parts.hostname:
            raise ConnectorError(f"{uri} is not a libvirt qemu+ssh:// URI with a host")
        params = dict(parse_qsl(parts.query))
        return SshTarget(
            host=parts.hostname,
            port=parts.port,
            user=unquote(parts.username) if parts.username else None,
            keyfile=params.get("keyfile") or None,
            command=params.get("command") or "ssh",
            no_verify=params.get("no_verify", "0") not in ("", "0"),
        )

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def argv(self, remote: Sequence[str] | None, options: Sequence[str] = ()) -> list[str]:
        """The ssh command running `remote` (an argv, quoted for the remote shell; None: no
        command) there. BatchMode: vmkeep never prompts (a password-only login fails with ssh's
        message)."""
        cmd = [self.command, "-T", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
        cmd += ["-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=15"]
        if self.no_verify:
            cmd += ["-o", "StrictHostKeyChecking=no"]
        if self.keyfile:
            cmd += ["-i", self.keyfile]
        if self.port:
            cmd += ["-p", str(self.port)]
        if self.user:
            cmd += ["-l", self.user]
        if self.control_path:
            cmd += ["-o", f"ControlPath={self.control_path}", "-o", "ControlMaster=no"]
        command = [] if remote is None else [shlex.join(remote)]
        return [*cmd, *options, "--", self.host, *command]

    def run(self, script: str, args: Sequence[str], what: str, timeout: float = 120.0) -> str:
        """`sh -c script` with `args` on the host; its stdout. ConnectorError (one line) when
        ssh cannot reach or log into the host, or the script fails."""
        return self.run_bytes(script, args, what, timeout).decode("utf-8", "replace")

    def run_bytes(
        self, script: str, args: Sequence[str], what: str, timeout: float = 120.0
    ) -> bytes:
        """`run`, its stdout as the bytes sent."""
        argv = self.argv(["sh", "-c", script, "vmkeep", *args])
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
            )
        except FileNotFoundError:
            raise ConnectorError(f"cannot run {self.command!r} (ssh client) to {what}") from None
        except subprocess.TimeoutExpired:
            raise ConnectorError(
                f"cannot {what} on {self.host}: ssh gave no answer in {timeout:.0f} s"
            ) from None
        if done.returncode != 0:
            raise ConnectorError(
                f"cannot {what} on {self.host} over ssh: {error_line(done.stderr)} "
                f"(exit status {done.returncode})"
            )
        return done.stdout

    def stat(self, paths: Sequence[str]) -> dict[str, VolumeStamp | str]:
        """path -> its identity on the host, or why it has none (missing). A failed ssh raises:
        an unreachable host must not look like a changed replica."""
        if not paths:
            return {}
        out = self.run(_STAT, list(paths), "read the replica volumes' identities").splitlines()
        if len(out) != len(paths):
            raise ConnectorError(f"unexpected stat output from {self.host}: {out!r}")
        found: dict[str, VolumeStamp | str] = {}
        for path, line in zip(paths, out, strict=True):
            if line.strip() == "missing":
                found[path] = f"replica volume {path} is missing on {self.host}"
                continue
            try:
                size, inode, mtime, ctime = line.split()
                found[path] = VolumeStamp(path, int(size), int(inode), _ns(mtime), _ns(ctime))
            except ValueError:
                raise ConnectorError(
                    f"unexpected stat output from {self.host} for {path}: {line!r}"
                ) from None
        return found

    def open_image(
        self, path: str, fmt: str, *, writable: bool, name: str = "", bitmap: str | None = None
    ) -> NbdImage:
        """`path` on the host served by a qemu-nbd there (image_nbd.NbdImage's interface);
        ConnectorError with ssh's or qemu-nbd's reason when it cannot be opened."""
        return RemoteNbdImage(self, path, fmt, writable=writable, name=name, bitmap=bitmap)


def _ns(stamp: str) -> int:
    """Seconds as "1795551609.223423913" -> nanoseconds, exactly (no float)."""
    sec, _, frac = stamp.partition(".")
    if not sec.lstrip("-").isdigit() or (frac and not frac.isdigit()):
        raise ValueError(stamp)
    return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])


def error_line(err: bytes | str) -> str:
    text = err.decode("utf-8", "replace") if isinstance(err, bytes) else err
    lines = [ln.strip().removeprefix("qemu-nbd: ") for ln in text.splitlines() if ln.strip()]
    return " ".join(lines) or "no message"


class RemoteNbdImage(NbdImage):
    """An NbdImage whose qemu-nbd runs on an ssh host. close() waits until that qemu-nbd has
    exited (the image lock is free then: libvirt snapshots the replica next)."""

    def __init__(
        self,
        target: SshTarget,
        path: str,
        fmt: str,
        *,
        writable: bool,
        name: str = "",
        bitmap: str | None = None,
    ) -> None:
        self._target = target
        self._proc: subprocess.Popen[bytes] | None = None
        super().__init__(path, fmt, writable=writable, name=name, bitmap=bitmap)

    def _connect(self, fmt: str) -> Any:
        mod = nbd()
        local_dir = tempfile.mkdtemp(prefix="vmkeep-nbd-", dir=short_tmp())
        local = os.path.join(local_dir, "s")
        remote_dir = f"/tmp/vmkeep-nbd-{secrets.token_hex(8)}"
        remote = ["sh", "-c", _SERVE, "vmkeep-nbd", remote_dir]
        remote += [*qemu_nbd_options(fmt, self.writable, self.bitmap), self.path]
        forward = ["-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindMask=0177"]
        argv = self._target.argv(remote, [*forward, "-L", f"{local}:{remote_dir}/s"])
        try:
            try:
                self._proc = subprocess.Popen(
                    ["setpriv", "--pdeathsig", "KILL", "--", *argv],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=self._log_fd,
                )
            except OSError as exc:
                raise self._failed(f"cannot run {self._target.command!r}: {exc.strerror}") from None
            self._wait_ready()
            h = nbd_handle()
            try:
                self.add_contexts(h)
                h.connect_unix(local)
            except mod.Error as exc:
                with contextlib.suppress(Exception):
                    h.shutdown()
                del h
                raise self._failed(self._qemu_nbd_error() or one_line(exc)) from None
            return h
        except BaseException:
            self._end_server()
            raise
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)  # the connection is made (or failed)

    def _failed(self, reason: str) -> ConnectorError:
        return ConnectorError(
            f"cannot open {self.path} on {self._target.host} with qemu-nbd over ssh: {reason}"
        )

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._failed(f"no answer in {READY_TIMEOUT:.0f} s")
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(proc.stdout.fileno(), 64)
                if not chunk:  # ssh ended: its (or qemu-nbd's) message is in the log
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(5)
                    status = f"exit status {proc.returncode}"
                    raise self._failed(f"{self._qemu_nbd_error() or 'no message'} ({status})")
                line += chunk
        if line.strip() != b"ready":
            raise self._failed(f"unexpected answer {line.strip()!r}")

    def _end_server(self) -> None:
        """End of input tells the remote script to stop qemu-nbd (already gone after a clean
        disconnect) and wait for it; ssh exits when it has."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _close(proc.stdin)
        try:
            proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _close(proc.stdout)


def short_tmp() -> str:
    """$TMPDIR unless it is too long for a Unix socket path (108 bytes with the names)."""
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) <= 64 else "/tmp"


def _close(f: IO[bytes] | None) -> None:
    if f is not None:
        with contextlib.suppress(OSError):
            f.close()
