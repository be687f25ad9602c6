"""A private sshd on a loopback port with throw-away keys, so tests reach the local libvirtd
through qemu+ssh:// and vmkeep takes the remote-URI code paths (upload streams, TCP NBD)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def ssh_libvirt_uri(d: Path) -> Iterator[str]:
    """qemu+ssh://root@127.0.0.1:PORT/system through an sshd whose files live in `d` (the
    test is skipped when openssh is not installed)."""
    if not os.path.exists(SSHD) or shutil.which("ssh") is None:
        pytest.skip("openssh-server / ssh not installed (scripts/install-libvirt.sh adds them)")
    for key in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True
        )
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port, bare = free_port(), free_port()
    forced = _host_without_qemu_nbd(d)
    (d / "sshd_config").write_text(
        f"Port {port}\nPort {bare}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"Match LocalPort {bare}\n  ForceCommand {forced}\n"
    )
    (d / "bare_port").write_text(str(bare))
    # no_verify=1 lets ssh accept the throw-away host key and record it: in a file of ours,
    # not root's ~/.ssh/known_hosts (libvirt runs the URI's `command` as its ssh client).
    wrapper = d / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec ssh -o UserKnownHostsFile={d / "known_hosts"} "$@"\n')
    wrapper.chmod(0o755)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    with open(d / "sshd.log", "wb") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}")
            time.sleep(0.05)
        yield (
            f"qemu+ssh://root@127.0.0.1:{port}/system"
            f"?keyfile={d / 'client'}&no_verify=1&no_tty=1&command={wrapper}"
        )
    finally:
        proc.terminate()
        proc.wait(10)


def _host_without_qemu_nbd(d: Path) -> Path:
    """A ForceCommand running the client's command with a PATH of only a shell and the few
    tools vmkeep's remote scripts use: through the second port the host "has no qemu-nbd"
    (root's shell start-up files reset any PATH the client sends)."""
    bin_dir = d / "bare-bin"
    bin_dir.mkdir()
    for tool in ("sh", "mkdir", "rm", "sleep", "cat", "stat"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    forced = d / "bare-host"
    forced.write_text(f'#!/bin/sh\nPATH={bin_dir} exec sh -c "$SSH_ORIGINAL_COMMAND"\n')
    forced.chmod(0o755)
    return forced


def port_without_qemu_nbd(uri: str) -> int:
    """The sshd port of a URI ssh_libvirt_uri made where the host seems to lack qemu-nbd."""
    return int((_dir_of(uri) / "bare_port").read_text())


def _dir_of(uri: str) -> Path:
    return Path(parse_qs(urlsplit(uri).query)["keyfile"][0]).parent


def authorized_keys(uri: str) -> Path:
    """The sshd's authorized_keys file of a URI ssh_libvirt_uri made: emptying it makes every
    new ssh login fail (connections already open stay up), as a revoked or wrong key would."""
    return _dir_of(uri) / "authorized_keys"
