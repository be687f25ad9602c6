"""Runs that die at an exact instant on S3, Azure and SMB leave a repository that lists only
complete points, verifies, takes the next backup at once and restores hash-equal
(docs/FORMAT.md §1 atomicity, §5.4, §6). SIGKILLs at random instants found nothing these
don't pin down (/tmp/helpers/crash_remotes.py); these dies are deterministic."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from vmkeep.remotes.location import open_remote
from vmkeep.repository.repository import Repository

from .conftest import VMKEEP, Cli, disk_hashes
from .test_faults import random_vm
from .test_remotes_cli import remote  # noqa: F401  (the S3 / Azure / SMB server fixture)

PYTHON = str(Path(VMKEEP).with_name("python"))

# The process dies half-way through a send once more than DIE_AFTER bytes went out in all
# (chunk bodies are nearly all of it): an upload cut mid-request, as a SIGKILL during an upload
# would. Every send counts: how a body is split into sends depends on the HTTP stack (Debian's
# urllib3 1.26 streams botocore's aws-chunked bodies in 8 KiB blocks, urllib3 2 in larger ones).
DIE_MID_BODY = """
import os, socket, sys, threading
limit, sent, guard = int(os.environ["DIE_AFTER"]), [0], threading.Lock()
def cut(send):
    def wrapper(self, data, *args):
        view = memoryview(data).cast("B")
        with guard:
            sent[0] += len(view)
            if sent[0] > limit:
                send(self, view[: len(view) // 2], *args)
                os._exit(9)
        return send(self, data, *args)
    return wrapper
socket.socket.sendall = cut(socket.socket.sendall)
socket.socket.send = cut(socket.socket.send)
from vmkeep.interfaces.cli.app import main
sys.argv = ["vmkeep", *sys.argv[1:]]
main()
"""

# gc dies after deleting its second garbage chunk, holding its exclusive lock.
DIE_MID_SWEEP = """
import os, sys
from vmkeep.repository.repository import Repository
calls, delete = [0], Repository.delete_chunk
def dying(self, chunk_id):
    delete(self, chunk_id)
    calls[0] += 1
    if calls[0] == 2:
        os._exit(9)
Repository.delete_chunk = dying
from vmkeep.interfaces.cli.app import main
sys.argv = ["vmkeep", *sys.argv[1:]]
main()
"""


def dies(cli: Cli, script: str, *args: str, **env: str) -> None:
    done = subprocess.run(
        [PYTHON, "-c", script, *args],
        env=dict(cli.env, **env),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 9, done.stderr[-2000:]


def every_chunk_reads(cli: Cli, url: str) -> int:
    """Opens every chunk object the remote lists (referenced or not): a partial object left by
    a cut upload would be listed, then deduplicated against by the next backup."""
    saved = dict(os.environ)
    os.environ.update(
        {k: v for k, v in cli.env.items() if k.startswith(("AWS_", "AZURE_", "VMKEEP_"))}
    )
    try:
        remote = open_remote(url)
        repo = Repository.open(remote, lambda: cli.env["VMKEEP_PASSPHRASE"].encode())
        count = 0
        for chunk_id, _ in repo.list_chunks():
            repo.get_chunk(chunk_id)  # raises IntegrityError on a partial or corrupt object
            count += 1
        return count
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_backup_and_gc_dying_mid_write_on_every_remote(
    cli: Cli,
    remote: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    cli("init", remote, "--chunk-size", "256K")
    vm = random_vm(tmp_path, "victim", 24 << 20, 7)  # random data: every chunk is new
    first = cli("backup", str(vm), "--remote", remote, "--json").json()
    first_hashes = disk_hashes(vm)
    stored = every_chunk_reads(cli, remote)
    with open(vm / "disk0.img", "r+b") as f:  # 8 MiB of new data: 32 new chunks to upload
        f.seek(4 << 20)
        f.write(os.urandom(8 << 20))

    # 1. a backup cut mid-upload, after ~3 MiB of chunk bodies went out
    dies(cli, DIE_MID_BODY, "backup", str(vm), "--remote", remote, DIE_AFTER=str(3 << 20))
    listed = cli("list", "--remote", remote, "--json").json()
    assert [p["restore_point"] for p in listed["restore_points"]] == [first["restore_point"]]
    assert every_chunk_reads(cli, remote) > stored  # the dead run stored some chunks, all whole
    assert cli("verify", "--remote", remote, "--json").json()["ok"]
    began = time.monotonic()
    second = cli("backup", str(vm), "--remote", remote, "--json").json()
    assert time.monotonic() - began < 60  # its lock (dead pid on this host) did not block
    second_hashes = disk_hashes(vm)
    cli("restore", second["restore_point"], "--remote", remote, "--to", str(tmp_path / "r2"))
    (restored,) = (tmp_path / "r2").iterdir()
    assert disk_hashes(restored) == second_hashes != first_hashes

    # 2. gc dying mid-sweep, holding its exclusive lock
    cli("forget", second["restore_point"], "--remote", remote)
    garbage = cli("gc", "--remote", remote, "--dry-run", "--json").json()["chunks_deleted"]
    assert garbage == 32  # the 8 MiB the second point alone holds
    dies(cli, DIE_MID_SWEEP, "gc", "--remote", remote)
    left = cli("gc", "--remote", remote, "--dry-run", "--json").json()["chunks_deleted"]
    assert 0 < left <= garbage - 2  # it died mid-sweep (deletes run several at a time)
    assert cli("verify", "--remote", remote, "--json").json()["ok"]
    third = cli("backup", str(vm), "--remote", remote, "--json").json()  # not blocked by gc's lock
    report = cli("gc", "--remote", remote, "--json").json()
    assert report["stale_locks_removed"] == 1  # the dead gc's (the dead backup's went in 1.)
    assert every_chunk_reads(cli, remote) == stored + 32  # the points' chunks, nothing else
    for point, hashes in ((first, first_hashes), (third, second_hashes)):
        target = tmp_path / f"r-{point['restore_point']}"
        cli("restore", point["restore_point"], "--remote", remote, "--to", str(target))
        (restored,) = target.iterdir()
        assert disk_hashes(restored) == hashes
    assert cli("verify", "--remote", remote, "--json").json()["ok"]
