"""Commands on the host of a qemu+ssh:// URI: qemu-img batches (qemu_img.SshQemuImg: each
command's exit status and output framed apart) and the one ssh connection a run shares
(ssh_master.SshMaster). The sshd is real (ssh_transport.py) and the "remote host" is this one,
so every answer is compared with qemu-img run here, and its log counts the logins."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.libvirt.ssh_transport import authorized_keys, port_without_qemu_nbd, ssh_libvirt_uri
from vmkeep.connectors.libvirt.transport import qemu_img
from vmkeep.connectors.libvirt.transport.ssh_master import PREFIX, SshMaster, remove_dead_dirs
from vmkeep.connectors.libvirt.transport.ssh_nbd import SshTarget
from vmkeep.errors import ConnectorError


@pytest.fixture(scope="module")
def ssh_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with ssh_libvirt_uri(tmp_path_factory.mktemp("sshd")) as uri:
        yield uri


def make_image(path: Path, size: str = "8M") -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return str(path)


def test_batches_match_qemu_img_run_here(ssh_uri: str, tmp_path: Path) -> None:
    remote = qemu_img.SshQemuImg(SshTarget.from_uri(ssh_uri))
    # a name the remote shell must not split or expand
    odd = make_image(tmp_path / "a b'$(touch x)\"c-é€.qcow2")  # and multi-byte UTF-8
    plain = make_image(tmp_path / "plain.qcow2", "16M")
    assert qemu_img.add_bitmaps(remote, [odd, plain], "vmkeep-bm") == {}
    infos = qemu_img.image_infos(remote, [odd, plain])
    assert infos == qemu_img.image_infos(qemu_img.LOCAL, [odd, plain])
    assert infos[plain]["virtual-size"] == 16 << 20
    assert qemu_img.bitmaps(infos[odd]) == {"vmkeep-bm": ["auto"]}
    assert not (tmp_path / "x").exists() and not Path("x").exists()
    # one failure in a batch: the others' results stay their own
    missing = str(tmp_path / "missing.qcow2")
    failed = qemu_img.add_bitmaps(remote, [plain, missing, odd], "second")
    assert list(failed) == [missing] and "No such file" in failed[missing], failed
    assert sorted(qemu_img.bitmaps(qemu_img.image_infos(remote, [plain])[plain])) == [
        "second",
        "vmkeep-bm",
    ]
    # removing: a bitmap already gone counts as removed; a missing image does not
    assert qemu_img.remove_bitmaps(remote, [odd, plain, missing], "second") == [missing]
    assert qemu_img.remove_bitmaps(remote, [odd, plain], "second") == []
    with pytest.raises(ConnectorError) as err:
        qemu_img.image_infos(remote, [plain, missing])
    message = str(err.value)
    assert "\n" not in message and missing in message and "on 127.0.0.1 over ssh" in message


def test_host_without_qemu_img(ssh_uri: str, tmp_path: Path) -> None:
    image = make_image(tmp_path / "x.qcow2")
    target = SshTarget.from_uri(ssh_uri)
    bare = qemu_img.SshQemuImg(replace(target, port=port_without_qemu_nbd(ssh_uri)))
    with pytest.raises(ConnectorError, match="qemu-img is not installed on this host") as err:
        qemu_img.image_infos(bare, [image])
    assert "\n" not in str(err.value)
    assert qemu_img.remove_bitmaps(bare, [image], "x") == [image]  # nothing removed there


def logins(uri: str) -> int:
    log = authorized_keys(uri).parent / "sshd.log"
    return log.read_text(errors="replace").count("Accepted publickey")


def test_one_login_serves_a_whole_run(ssh_uri: str, tmp_path: Path) -> None:
    image = make_image(tmp_path / "x.qcow2")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", image], check=True,
        capture_output=True,
    )  # fmt: skip
    before = logins(ssh_uri)
    with SshMaster(SshTarget.from_uri(ssh_uri)) as master:
        tool = qemu_img.SshQemuImg(master.target)
        for _ in range(3):
            assert qemu_img.image_infos(tool, [image])[image]["virtual-size"] == 8 << 20
        with master.target.open_image(image, "qcow2", writable=False) as served:
            assert served.read(1 << 20, 65536) == b"\x5a" * 65536
        control = master.target.control_path
        assert os.path.exists(control)
        assert logins(ssh_uri) == before + 1  # the master's; the rest were sessions over it
    assert not os.path.exists(os.path.dirname(control))


KILLED = """
import os, signal, sys
from vmkeep.connectors.libvirt.transport.ssh_master import SshMaster
from vmkeep.connectors.libvirt.transport.ssh_nbd import SshTarget

master = SshMaster(SshTarget.from_uri(sys.argv[1]))
image = master.target.open_image(sys.argv[2], "qcow2", writable=False)
print(master.target.control_path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def serving(image: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"qemu-nbd") and image.encode() in argv:
                found.append(int(entry.name))
    return found


def test_killed_run_leaves_no_server_and_its_directory_goes_next_time(
    ssh_uri: str, tmp_path: Path
) -> None:
    """vmkeep SIGKILLed with a remote qemu-nbd open over its master: the master dies with it
    (pdeathsig), the session's input ends there, qemu-nbd stops; the dead control directory is
    removed when the next master starts."""
    image = make_image(tmp_path / "k.qcow2")
    run = subprocess.run(
        [sys.executable, "-c", KILLED, ssh_uri, image], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    control = run.stdout.strip()
    deadline = time.monotonic() + 15
    while serving(image) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert serving(image) == []
    assert os.path.exists(control)  # nobody could remove it
    with SshMaster(SshTarget.from_uri(ssh_uri)):
        assert not os.path.exists(os.path.dirname(control))


def test_only_dead_control_directories_are_removed(tmp_path: Path) -> None:
    dead, live, young, old = (tmp_path / f"{PREFIX}{n}" for n in ("dead", "live", "young", "old"))
    for d in (dead, live, young, old):
        d.mkdir()
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(str(dead / "c"))  # bound, never listening: as after its master died
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(live / "c"))
    listening.listen()
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))  # no socket: a login that never finished
    os.utime(live, (hour_ago, hour_ago))
    try:
        assert sorted(remove_dead_dirs(str(tmp_path))) == sorted([str(dead), str(old)])
    finally:
        listening.close()
    assert live.exists() and young.exists() and not dead.exists() and not old.exists()
