"""`vmkeep mount` (root, FUSE): the image file is hash-equal to the raw restore, the demo VM's
ext4 partition mounts read-only through `losetup -r` and its marker file reads back, `fsck -n`
finds it clean, writes are refused, `vmkeep umount` and signals end the serving process and
leave the mount point empty, and bad input is one error line (docs/MOUNT-EXPORT.md §3)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmkeep.connectors.files.demo import DEMO_MARKER, NOTES_PATH, PARTITION_START

from .conftest import VMKEEP, Cli, sha256

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"),
    reason="needs root, /dev/fuse and fusermount3",
)


@dataclass
class Demo:
    cli: Cli
    repo: Path
    point: str
    raw: Path  # its raw restore


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """A backed-up demo VM (MBR + ext4), shared by the module's tests (they only read it)."""
    from vmkeep.connectors.files.demo import create_demo_vm

    home = tmp_path_factory.mktemp("mount")
    cli = Cli(home)
    repo = home / "repo"
    cli("init", str(repo))
    vm = create_demo_vm(home, "web01", 48 << 20)
    point = cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"]
    raw = home / "restored.raw"
    cli("export", point, "disk0", str(raw), "--remote", str(repo))
    return Demo(cli, repo, point, raw)


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    mp = tmp_path / "mnt"
    mp.mkdir()
    yield mp
    if os.path.ismount(mp):  # a failed test must not leave a mount behind
        subprocess.run(["fusermount3", "-uz", str(mp)], check=False)


def test_mount_reads_like_the_restore_and_umount_ends_it(
    demo: Demo, mountpoint: Path, tmp_path: Path
) -> None:
    cli, repo_dir, point, raw = demo.cli, demo.repo, demo.point, demo.raw
    out = cli("mount", point, "disk0", str(mountpoint), "--remote", str(repo_dir)).out
    assert out.strip() == str(mountpoint / "disk0.raw")
    assert os.path.ismount(mountpoint)
    image = mountpoint / "disk0.raw"
    assert os.listdir(mountpoint) == ["disk0.raw"]
    assert image.stat().st_size == raw.stat().st_size
    assert sha256(image) == sha256(raw)
    # writes: refused by the kernel on the ro mount, whatever the mode bits say
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
        with pytest.raises(OSError) as caught:
            os.close(os.open(image, flags))
        assert caught.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError):
        (mountpoint / "new").write_text("x")
    assert os.listdir(mountpoint) == ["disk0.raw"] and sha256(image) == sha256(raw)
    # the guest's file system, through a read-only loop device
    loop = subprocess.run(
        ["losetup", "-r", "-f", "--show", "-o", str(PARTITION_START), str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    fs = tmp_path / "fs"
    fs.mkdir()
    try:
        fsck = subprocess.run(["fsck.ext4", "-n", "-f", loop], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        subprocess.run(["mount", "-o", "ro", "-t", "ext4", loop, str(fs)], check=True)
        try:
            assert DEMO_MARKER in (fs / NOTES_PATH.lstrip("/")).read_text()
        finally:
            subprocess.run(["umount", str(fs)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    cli("umount", str(mountpoint))
    assert not os.path.ismount(mountpoint) and os.listdir(mountpoint) == []
    run = cli("umount", str(mountpoint), ok=False)
    assert "not a vmkeep mount" in run.err


def start_foreground(cli: Cli, point: str, repo: Path, mp: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [VMKEEP, "mount", point, "disk0", str(mp), "--foreground", "--remote", str(repo)],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not os.path.ismount(mp):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("how", ["fusermount3", "SIGTERM", "SIGINT"])
def test_the_serving_process_exits_when_unmounted_or_signalled(
    demo: Demo, mountpoint: Path, how: str
) -> None:
    raw = demo.raw
    proc = start_foreground(demo.cli, demo.point, demo.repo, mountpoint)
    with open(mountpoint / "disk0.raw", "rb") as f:
        assert f.read(4096) == raw.read_bytes()[:4096]
    if how == "fusermount3":
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    else:
        proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Ignoring" not in err  # no libfuse noise either
    assert not os.path.ismount(mountpoint) and os.listdir(mountpoint) == []


def test_bad_input_is_one_line_and_mounts_nothing(
    demo: Demo, mountpoint: Path, tmp_path: Path
) -> None:
    cli, point, repo = demo.cli, demo.point, str(demo.repo)
    run = cli("mount", point, "disk9", str(mountpoint), "--remote", repo, ok=False)
    assert "no disk 'disk9'" in run.err and run.code not in (0, 70)
    run = cli("mount", "nosuchpoint", "disk0", str(mountpoint), "--remote", repo, ok=False)
    assert run.code not in (0, 70)
    plain = tmp_path / "file"
    plain.write_text("x")
    run = cli("mount", point, "disk0", str(plain), "--remote", repo, ok=False)
    assert "not a directory" in run.err
    assert not os.path.ismount(mountpoint)
    cli("mount", point, "disk0", str(mountpoint), "--remote", repo)
    run = cli("mount", point, "disk0", str(mountpoint), "--remote", repo, ok=False)
    assert "already a mount point" in run.err
    cli("umount", str(mountpoint))
    run = cli("umount", str(tmp_path), ok=False)
    assert "not a vmkeep mount" in run.err


def test_the_background_process_gets_the_passphrase_through_a_pipe(
    demo: Demo, mountpoint: Path, tmp_path: Path
) -> None:
    """The serving child inherits a wrong VMKEEP_PASSPHRASE: only the pipe can open the repo."""
    secret = tmp_path / "passphrase"
    secret.write_text(demo.cli.env["VMKEEP_PASSPHRASE"])
    args = ("mount", demo.point, "disk0", str(mountpoint), "--remote", str(demo.repo))
    demo.cli("--passphrase-file", str(secret), *args, env={"VMKEEP_PASSPHRASE": "wrong"})
    try:
        assert sha256(mountpoint / "disk0.raw") == sha256(demo.raw)
    finally:
        demo.cli("umount", str(mountpoint))
    run = demo.cli(*args, env={"VMKEEP_PASSPHRASE": "wrong"}, ok=False)
    assert run.code not in (0, 70) and not os.path.ismount(mountpoint)
