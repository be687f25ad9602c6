"""A throw-away Samba server on 127.0.0.1 for the SMB remote's tests.

Everything Samba writes (config, passdb, locks, state, logs, pid) lives in one temp directory,
so it never touches a system Samba. Needs Debian's `samba` package and root (to create the
Unix user the share is served as and to set its SMB password)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "vmkeeptest"
PASSWORD = "vmkeep-Test-pw-1"
SHARE = "vmkeep"
READ_ONLY_SHARE = "vmkeep-ro"
SMBD = shutil.which("smbd") or "/usr/sbin/smbd"
SMBPASSWD = shutil.which("smbpasswd") or "/usr/bin/smbpasswd"


class ServerUnavailable(Exception):
    """Samba cannot be installed or started here; the tests skip with this reason."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_user() -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(USER)
    if os.geteuid() != 0:
        raise ServerUnavailable(f"user {USER} does not exist and creating it needs root")
    res = subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0 and "already exists" not in res.stderr:
        raise ServerUnavailable(f"useradd {USER} failed: {res.stderr.strip()}")
    return pwd.getpwnam(USER)


class SambaServer:
    """smbd in the foreground, serving `share_dir` as SHARE (and a read-only share)."""

    def __init__(self) -> None:
        # Not pytest's tmp_path: its parents are 0700, and smbd serves files as USER, who must
        # be able to reach the share directory.
        self.workdir = Path(tempfile.mkdtemp(prefix="vmkeep-smb-"))
        self.workdir.chmod(0o711)
        self.host = "127.0.0.1"
        self.port = 0
        self.user = USER
        self.password = PASSWORD
        self.share = SHARE
        self.share_dir = self.workdir / "share"
        self.ro_dir = self.workdir / "share-ro"
        self.conf = self.workdir / "smb.conf"
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, path: str = "", share: str | None = None) -> str:
        tail = f"/{path}" if path else ""
        return f"smb://{self.user}@{self.host}:{self.port}/{share or self.share}{tail}"

    def start(self, timeout: float = 15.0) -> None:
        if not os.path.exists(SMBD):
            raise ServerUnavailable("smbd not found: apt-get install samba")
        if os.geteuid() != 0:
            raise ServerUnavailable("smbd must run as root to serve files as another user")
        user = _ensure_user()
        for d in ("private", "lock", "state", "cache", "pid", "ncalrpc", "log"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        for d in (self.share_dir, self.ro_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, user.pw_uid, user.pw_gid)
        if self.port == 0:
            self.port = _free_port()
        self._write_conf()
        res = subprocess.run(
            [SMBPASSWD, "-c", str(self.conf), "-a", "-s", USER],
            input=f"{PASSWORD}\n{PASSWORD}\n",
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise ServerUnavailable(f"smbpasswd failed: {(res.stderr or res.stdout).strip()}")
        log = open(self.workdir / "log" / "smbd.out", "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [SMBD, "--foreground", "--no-process-group", f"--configfile={self.conf}", "-d", "1"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its forked children share this group, stopped together
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerUnavailable(f"smbd exited at start: {self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.5),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise ServerUnavailable(f"smbd did not listen within {timeout:.0f} s: {self.log_tail()}")

    def _write_conf(self) -> None:
        w = self.workdir
        self.conf.write_text(
            f"""[global]
    server role = standalone server
    workgroup = WORKGROUP
    netbios name = VMKEEPTEST
    smb ports = {self.port}
    interfaces = 127.0.0.1
    bind interfaces only = yes
    disable netbios = yes
    private dir = {w}/private
    lock directory = {w}/lock
    state directory = {w}/state
    cache directory = {w}/cache
    pid directory = {w}/pid
    ncalrpc dir = {w}/ncalrpc
    log file = {w}/log/log.%m
    max log size = 1000
    passdb backend = tdbsam:{w}/private/passdb.tdb
    map to guest = never
    load printers = no
    printing = bsd
    printcap name = /dev/null
    disable spoolss = yes
    usershare path =
    server min protocol = SMB2_10

[{SHARE}]
    path = {self.share_dir}
    read only = no
    valid users = {USER}
    create mask = 0600
    directory mask = 0700

[{READ_ONLY_SHARE}]
    path = {self.ro_dir}
    read only = yes
    valid users = {USER}
"""
        )

    def owner(self) -> tuple[int, int]:
        """uid and gid the share's files belong to."""
        user = pwd.getpwnam(USER)
        return user.pw_uid, user.pw_gid

    def pid(self) -> int:
        """smbd's pid, also the id of its process group (its children are in it)."""
        if self._proc is None:
            raise RuntimeError("smbd is not running")
        return self._proc.pid

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.workdir / "log").glob("*")):
            with contextlib.suppress(OSError):
                out += f.read_text(errors="replace").splitlines()[-lines:]
        return " | ".join(out[-lines:])

    def stop(self) -> None:
        """SIGTERM smbd's process group (smbd and its per-connection children), then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):  # children that outlived the parent
            os.killpg(proc.pid, signal.SIGKILL)

    def cleanup(self) -> None:
        """Stop and remove every file the server and the tests left."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
