"""qemu-img run on the host of a qemu+ssh:// URI (qemu_img.SshQemuImg): one ssh login per batch,
each command's exit status and output framed apart. The sshd is real (ssh_transport.py) and the
"remote host" is this one, so every answer is compared with qemu-img run here."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.libvirt.ssh_transport import port_without_qemu_nbd, ssh_libvirt_uri
from vmkeep.connectors.libvirt import qemu_img
from vmkeep.connectors.libvirt.ssh_nbd import SshTarget
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
    odd = make_image(tmp_path / "a b'$(touch x)\"c.qcow2")
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
