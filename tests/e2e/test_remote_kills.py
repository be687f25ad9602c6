"""Runs that die at an exact instant on S3, Azure and SMB leave a repository that lists only
complete points, verifies, takes the next backup at once and restores hash-equal
(docs/FORMAT.md §1 atomicity, §5.4, §6, §13.7), with one object per chunk and with blocks
in packs. SIGKILLs at random instants found nothing these don't pin down
(/tmp/helpers/crash_remotes.py, bench/kill_campaign.py); these dies are deterministic."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from .conftest import Cli, disk_hashes, open_as_cli
from .dying import DIE_MID_BODY, dies
from .format3_census import Census, census
from .test_faults import random_vm
from .test_format3 import init3, restore_hashes
from .test_format3_kills import DIE_AT_STEP, points
from .test_remotes_cli import remote  # noqa: F401  (the S3 / Azure / SMB server fixture)

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


def every_chunk_reads(cli: Cli, url: str) -> int:
    """Opens every chunk object the remote lists (referenced or not): a partial object left by
    a cut upload would be listed, then deduplicated against by the next backup."""
    with open_as_cli(cli, url) as repo:
        count = 0
        for chunk_id, _ in repo.list_chunks():
            repo.get_chunk(chunk_id)  # raises IntegrityError on a partial or corrupt object
            count += 1
        return count


Stored = TypeVar("Stored")


class Layout(Protocol[Stored]):
    """What the scenario needs to know of a layout: how much to change and where to cut,
    what it stores and how gc dies in it."""

    new_data: int  # bytes the second backup has to store
    cut_after: int  # bytes sent when the backup dies
    deleted: str  # gc's count of deleted objects

    def init(self, cli: Cli, url: str) -> None: ...
    def stored(self, cli: Cli, url: str) -> Stored: ...
    def check_cut(self, before: Stored, after: Stored) -> None: ...
    def check_garbage(self, garbage: int) -> None: ...
    def kill_gc(self, cli: Cli, url: str) -> None: ...
    def check_left(self, left: int, garbage: int) -> None: ...
    def check_end(self, cli: Cli, url: str, before: Stored) -> None: ...


class Chunks:
    """One object per chunk: format 2 (format 1's layout) with 256 KiB chunks."""

    new_data = 8 << 20  # 32 new chunks to upload
    cut_after = 3 << 20  # of chunk bodies
    deleted = "chunks_deleted"

    def init(self, cli: Cli, url: str) -> None:
        cli("init", url, "--chunk-size", "256K")

    def stored(self, cli: Cli, url: str) -> int:
        return every_chunk_reads(cli, url)

    def check_cut(self, before: int, after: int) -> None:
        assert after > before  # the dead run stored some chunks, all whole

    def check_garbage(self, garbage: int) -> None:
        assert garbage == 32  # the 8 MiB the second point alone holds

    def kill_gc(self, cli: Cli, url: str) -> None:
        """gc dying mid-sweep (two chunks deleted), holding its exclusive lock."""
        dies(cli, DIE_MID_SWEEP, "gc", "--remote", url)

    def check_left(self, left: int, garbage: int) -> None:
        assert 0 < left <= garbage - 2  # it died mid-sweep (deletes run several at a time)

    def check_end(self, cli: Cli, url: str, before: int) -> None:
        assert every_chunk_reads(cli, url) == before + 32  # the points' chunks, nothing else


class Packs:
    """Format 3: blocks in packs. 1 MiB chunks: a pack closes past 1 MiB once a whole chunk's
    blocks are in, so packs are 1-2 MiB and a cut after 8 MiB always finds complete ones (3
    uploads in flight)."""

    new_data = 16 << 20  # 8 to 16 packs
    cut_after = 8 << 20  # of pack bodies
    deleted = "packs_deleted"

    def init(self, cli: Cli, url: str) -> None:
        init3(cli, url, "--chunk-size", "1M", "--pack-size", "1M")

    def stored(self, cli: Cli, url: str) -> Census:
        return census(cli, url)  # every pack listed reads whole, blob by blob

    def check_cut(self, before: Census, after: Census) -> None:
        assert after.packs > before.packs and after.index_objects == before.index_objects

    def check_garbage(self, garbage: int) -> None:
        assert garbage >= 4  # the second point's packs and the dead backup's

    def kill_gc(self, cli: Cli, url: str) -> None:
        """gc dying mid-sweep (an old index object and a pack deleted), holding its lock."""
        dies(cli, DIE_AT_STEP, "gc", "--remote", url, DIE_STEP="gc-mid-pack-deletes")

    def check_left(self, left: int, garbage: int) -> None:
        assert 0 < left < garbage

    def check_end(self, cli: Cli, url: str, before: Census) -> None:
        after = census(cli, url)
        assert (after.unindexed, after.absent, after.other) == (0, 0, [])


@pytest.mark.parametrize("layout", [Chunks(), Packs()], ids=["chunks", "packs"])
def test_backup_and_gc_dying_mid_write_on_every_remote(
    cli: Cli,
    remote: str,  # noqa: F811
    tmp_path: Path,
    layout: Layout[Any],
) -> None:
    layout.init(cli, remote)
    vm = random_vm(tmp_path, "victim", 24 << 20, 7)  # random data: every chunk is new
    first = cli("backup", str(vm), "--remote", remote, "--json").json()
    first_hashes = disk_hashes(vm)
    stored = layout.stored(cli, remote)
    with open(vm / "disk0.img", "r+b") as f:
        f.seek(4 << 20)
        f.write(os.urandom(layout.new_data))

    # 1. a backup cut mid-upload
    dies(cli, DIE_MID_BODY, "backup", str(vm), "--remote", remote, DIE_AFTER=str(layout.cut_after))
    assert points(cli, remote) == [first["restore_point"]]
    layout.check_cut(stored, layout.stored(cli, remote))
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
    garbage = cli("gc", "--remote", remote, "--dry-run", "--json").json()[layout.deleted]
    layout.check_garbage(garbage)
    layout.kill_gc(cli, remote)
    left = cli("gc", "--remote", remote, "--dry-run", "--json").json()[layout.deleted]
    layout.check_left(left, garbage)
    assert cli("verify", "--remote", remote, "--json").json()["ok"]
    third = cli("backup", str(vm), "--remote", remote, "--json").json()  # not blocked by gc's lock
    report = cli("gc", "--remote", remote, "--json").json()
    assert report["stale_locks_removed"] == 1  # the dead gc's (the dead backup's went in 1.)
    layout.check_end(cli, remote, stored)
    for point, hashes in ((first, first_hashes), (third, second_hashes)):
        assert restore_hashes(cli, tmp_path, remote, point["restore_point"]) == hashes
    assert cli("verify", "--remote", remote, "--json").json()["ok"]
