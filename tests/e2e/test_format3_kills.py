"""Format 3 runs that die at an exact step (docs/DATA-PATH.md "Crash safety and concurrent
backups", "gc repacks without a full rewrite"; FORMAT.md §5.4, §13.6, §13.7): after each,
the repository lists only complete points, verifies, restores hash-equal, takes the next
backup and gc at once, and after that gc holds no pack the index does not name. The random
instants of bench/kill_campaign.py found nothing these don't pin down. Cut uploads and a
dying gc on S3, Azure and SMB: test_remote_kills.py, for both layouts."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from vmkeep.private_tmp import OLD_PREFIX, PREFIX

from .conftest import Cli, disk_hashes
from .dying import dies
from .format3_census import census
from .test_faults import random_vm
from .test_format3 import init3, restore_hashes

MiB = 1 << 20

# `python -c SCRIPT vmkeep-args...` with DIE_STEP (env) naming where the process dies
# (os._exit(9)), or stops (SIGSTOP) when DIE_FLAG names a file to create first.
DIE_AT_STEP = """
import os, sys
step = os.environ["DIE_STEP"]
import vmkeep.repository.pack_gc as gc
import vmkeep.repository.index_repair as repair
import vmkeep.repository.index_merge as index_merge

def die():
    # os._exit(9), or with DIE_FLAG set: create that file, SIGSTOP, then go on
    flag = os.environ.get("DIE_FLAG")
    if not flag:
        os._exit(9)
    import signal
    open(flag, "x").close()
    os.kill(os.getpid(), signal.SIGSTOP)

if step == "gc-before-index":  # repacked packs and their index written, the rest not
    gc.write_index = lambda *a, **k: die()
deletes = gc._delete
def dying_delete(store, names, lock, report):
    names = list(names)  # the packs' names come as a stream from gc's plan file
    packs = bool(names) and names[0].startswith("packs/")
    if step == "gc-before-index-deletes" and not packs:
        die()
    if step == "gc-mid-index-deletes" and not packs:
        store.remote.delete(names[0])
        die()
    if step == "gc-before-pack-deletes" and packs:
        die()
    if step == "gc-mid-pack-deletes" and packs:
        store.remote.delete(names[0])
        die()
    deletes(store, names, lock, report)
gc._delete = dying_delete
if step == "repair-before-deletes":
    repair._delete = lambda remote: lambda name: die()
if step == "repair-mid-deletes":
    import threading
    gate = threading.Lock()  # deletes run on several threads: only the first one deletes
    def one(remote):
        def delete(name):
            gate.acquire()  # never released: the others wait here until the process dies
            remote.delete(name)
            die()
        return delete
    repair._delete = one
if step == "index-loaded":  # its private index (the cache is off) built, then death
    import vmkeep.repository.packed_store as packed_store
    load = packed_store.load_index
    def load_and_die(*a, **k):
        load(*a, **k)
        die()
    packed_store.load_index = load_and_die
if step == "index-object-cached":  # a copy of its index object half-written in the cache
    import vmkeep.repository.blob_index as blob_index
    def put(self, index_id, data):
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f".tmp-{os.getpid()}-1").write_bytes(data[: len(data) // 2])
        die()
    blob_index.IndexCache.put = put
if step == "index-cache-replace":  # the cache file written beside, not renamed over yet
    real = os.replace
    def replace(src, dst, *a, **k):
        if os.path.basename(str(dst)).startswith("blobindex"):  # the base or a delta
            die()
        return real(src, dst, *a, **k)
    index_merge.os.replace = replace

from vmkeep.interfaces.cli.app import main
sys.argv = ["vmkeep", *sys.argv[1:]]
main()
"""


def overwrite(disk: Path, offset: int, size: int, seed: int) -> None:
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(random_bytes(size, seed))


def random_bytes(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


def points(cli: Cli, url: str) -> list[str]:
    rows = cli("list", "--remote", url, "--json").json()["restore_points"]
    return sorted(r["restore_point"] for r in rows)


class Repo:
    """A format 3 repository with 1 MiB packs and garbage of every kind gc handles: whole
    dead packs, packs mostly dead (repacked) and small packs of several deltas (merged)."""

    def __init__(self, cli: Cli, url: str, tmp_path: Path) -> None:
        self.cli, self.url, self.tmp = cli, url, tmp_path
        self.vm = tmp_path / "victim"
        self.disk = self.vm / "disk0.img"
        self.expected: dict[str, dict[str, str]] = {}
        self.round = 0

    def build(self) -> Repo:
        init3(self.cli, self.url, "--pack-size", "1M")
        random_vm(self.tmp, "victim", 8 * MiB, 5)
        first = self.backup()
        overwrite(self.disk, 0, 2 * MiB, 1)  # whole packs dead once `first` goes
        overwrite(self.disk, 3 * MiB, 704 << 10, 2)  # a pack mostly dead: repacked
        self.backup()
        for seed in (3, 4, 5):  # small packs: merged
            overwrite(self.disk, (5 + seed % 2) * MiB + seed * 65536, 65536, seed)
            self.backup()
        self.cli("forget", first, "--remote", self.url)
        del self.expected[first]
        return self

    def copy(self, cli: Cli, tmp_path: Path) -> Repo:
        """The same repository and VM for one test (built once: five backups take a while)."""
        shutil.copytree(self.url, tmp_path / "repo")
        shutil.copytree(self.vm, tmp_path / "victim")
        other = Repo(cli, str(tmp_path / "repo"), tmp_path)
        other.expected = dict(self.expected)
        return other

    def backup(self) -> str:
        point = self.cli("backup", str(self.vm), "--remote", self.url, "--json").json()
        self.expected[point["restore_point"]] = disk_hashes(self.vm)
        return str(point["restore_point"])

    def check(self) -> None:
        """Only the complete points and a verify that reads every blob; then the next backup
        and gc at once, nothing left over (every pack read whole) and exact restores."""
        assert points(self.cli, self.url) == sorted(self.expected)
        assert self.cli("verify", "--remote", self.url, "--json").json()["ok"]
        began = time.monotonic()
        overwrite(self.disk, 7 * MiB, 65536, 99)
        self.backup()
        gc = self.cli("gc", "--remote", self.url, "--json").json()
        assert time.monotonic() - began < 60  # no lock of the dead process blocked them
        assert gc["stale_locks_removed"] <= 1
        left = census(self.cli, self.url)
        assert (left.unindexed, left.absent, left.other) == (0, 0, [])
        # verify checked every blob of every point against its ID (a keyed hash of its
        # plaintext); restores of the oldest and newest points check the assembly too.
        self.round += 1
        ordered = sorted(self.expected)
        for point in {ordered[0], ordered[-1]}:
            where = self.tmp / str(self.round)
            assert restore_hashes(self.cli, where, self.url, point) == self.expected[point]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    root = tmp_path_factory.mktemp("template")
    return Repo(Cli(root), str(root / "repo"), root).build()


@pytest.fixture
def repo(template: Repo, cli: Cli, tmp_path: Path) -> Repo:
    return template.copy(cli, tmp_path)


GC_STEPS = [
    "gc-before-index",
    "gc-before-index-deletes",
    "gc-mid-index-deletes",
    "gc-before-pack-deletes",
    "gc-mid-pack-deletes",
]


@pytest.mark.parametrize("step", GC_STEPS)
def test_gc_dying_at_each_step(cli: Cli, repo: Repo, step: str) -> None:
    plan = cli("gc", "--remote", repo.url, "--dry-run", "--json").json()
    assert plan["packs_repacked"] >= 3  # dead blobs in most packs, small packs merged
    before = census(cli, repo.url)
    dies(cli, DIE_AT_STEP, "gc", "--remote", repo.url, DIE_STEP=step)
    after = census(cli, repo.url)
    if step == "gc-before-index":  # new packs (and their index) beside the old ones
        assert after.packs > before.packs
    if step.endswith("pack-deletes"):  # every old index object gone, not every pack
        assert after.unindexed > 0
    assert after.absent == 0  # never an index entry whose pack is gone
    repo.check()


@pytest.mark.parametrize("step", ["repair-before-deletes", "repair-mid-deletes"])
def test_repair_index_dying_between_write_and_delete(cli: Cli, repo: Repo, step: str) -> None:
    before = census(cli, repo.url)
    dies(cli, DIE_AT_STEP, "repair", "index", "--remote", repo.url, DIE_STEP=step)
    after = census(cli, repo.url)
    # The new index objects were written before any old one went: duplicates, nothing lost.
    assert after.index_objects > before.index_objects - (step == "repair-mid-deletes")
    assert after.absent == 0 and after.packs == before.packs
    repo.check()


def test_index_cache_killed_before_its_rename(cli: Cli, repo: Repo, tmp_path: Path) -> None:
    """A process killed while it installs the merged local index (a delta or a new base,
    written beside, not yet renamed into place) leaves the old files, still valid but
    without the newest index objects, and a temporary directory: the next command merges
    again and removes the leftover."""
    cli("verify", "--remote", repo.url)  # this machine's index file
    cache = tmp_path / "cache"
    (installed,) = cache.rglob("blobindex")
    old = installed.read_bytes()
    overwrite(repo.disk, 6 * MiB, MiB, 42)
    new = repo.backup()  # its index object is new to the files...
    for delta in installed.parent.glob("blobindex.d-*"):
        delta.unlink()  # ...as if this backup had run on another machine
    installed.write_bytes(old)
    dies(cli, DIE_AT_STEP, "verify", "--remote", repo.url, DIE_STEP="index-cache-replace")
    assert installed.read_bytes() == old
    assert not list(installed.parent.glob("blobindex.d-*"))
    assert [p for p in installed.parent.iterdir() if ".tmp-" in p.name]
    assert restore_hashes(cli, tmp_path, repo.url, new) == repo.expected[new]
    assert not [p for p in installed.parent.iterdir() if ".tmp-" in p.name]
    merged = list(installed.parent.glob("blobindex.d-*"))
    assert merged or installed.read_bytes() != old  # the new object merged this time
    repo.check()


def test_private_index_of_a_killed_process_is_removed(cli: Cli, repo: Repo, tmp_path: Path) -> None:
    """With the cache off, each process builds the index in a private temporary directory
    removed at exit; a killed process cannot remove its own (a full copy of the index: 50
    bytes per blob), so the next process removes those whose process is gone."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    off = {"VMKEEP_CACHE_DIR": "off", "TMPDIR": str(tmp)}
    dies(cli, DIE_AT_STEP, "verify", "--remote", repo.url, DIE_STEP="index-loaded", **off)
    (left,) = tmp.iterdir()
    assert sum(f.stat().st_size for f in left.iterdir()) > 8000  # the index of ~200 blobs
    alive = tmp / f"{PREFIX}1-1-abcdefgh"  # pid 1 (init) with its start time: alive
    alive.mkdir()
    stat = Path("/proc/1/stat").read_text().rpartition(")")[2].split()
    alive = alive.rename(tmp / f"{PREFIX}1-{stat[19]}-abcdefgh")
    (tmp / f"{OLD_PREFIX}1-1-abcdefgh").mkdir()  # an older version's, of a process gone
    assert cli("verify", "--remote", repo.url, "--json", env=off).json()["ok"]
    assert list(tmp.iterdir()) == [alive]


def test_cached_index_object_of_a_killed_backup_is_removed(
    cli: Cli, repo: Repo, tmp_path: Path
) -> None:
    """A backup killed while it copies its index object into the cache (temporary name,
    then rename) leaves the temporary file: the next merge removes it, since its writer
    is gone (before, only an index object the remote no longer lists was removed)."""
    overwrite(repo.disk, 6 * MiB, MiB, 43)
    dies(
        cli,
        DIE_AT_STEP,
        "backup",
        str(repo.vm),
        "--remote",
        repo.url,
        DIE_STEP="index-object-cached",
    )
    (left,) = (tmp_path / "cache").rglob(".tmp-*")
    assert points(cli, repo.url) == sorted(repo.expected)
    repo.backup()  # merges the dead backup's index object, then tidies the cache
    assert not left.exists()
    repo.check()
