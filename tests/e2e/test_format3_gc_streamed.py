"""gc of format 3 in bounded memory (issue 15, "gc memory"): with sort buffers of a few keys
forced (so that many sorted runs merge), the real gc deletes, repacks and keeps exactly the
packs the in-memory plan (pack_plan_reference.plan_from over a set of every live blob, what gc did
before) names, every point restores hash-equal, and the run files are gone afterwards:
after success, after a failure midway and, at the next gc, after a kill."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.repository.pack_plan_reference import plan_from
from vmkeep.progress import SilentProgress
from vmkeep.remotes.location import open_remote
from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE
from vmkeep.repository.format import ZERO_ID
from vmkeep.repository.manifest_stream import referenced_chunks
from vmkeep.repository.packed_store import PackedStore
from vmkeep.repository.packs import pack_id_of_name

from .conftest import Cli, open_as_cli
from .dying import PYTHON
from .test_format3 import restore_hashes
from .test_format3_kills import MiB, Repo, overwrite

# `python -c SCRIPT vmkeep-args...`: gc's sort buffers forced small; every sort's run count
# appended to $RUNS_LOG; with $FAIL_AT set, the copy of the 2nd repacked pack fails ("error")
# or the process dies there ("kill").
SMALL_BUFFERS = """
import os, sys
import vmkeep.repository.pack_gc as gc
import vmkeep.repository.pack_repack as pack_repack
from vmkeep.errors import RemoteError
gc.LIVE_BUFFER, gc.SORT_BUFFER, gc.REFERENCED_BUFFER, gc.LOCATED_BUFFER = 40, 60, 2, 2
gc.LISTED_BUFFER, gc.TALLY_BUFFER, gc.WRITTEN_BUFFER = 3, 2, 1
Base = gc.LiveKeys
class Logged(Base):
    def close(self):
        with open(os.environ["RUNS_LOG"], "a") as f:
            f.write(f"{len(self.runs)} {self.key_size} {self.dir}\\n")
        super().close()
gc.LiveKeys = Logged
fail_at = os.environ.get("FAIL_AT")
copy = pack_repack.copy_pack
copied = []
def failing_copy(store, writer, pack_id, entries):
    copied.append(pack_id)
    if fail_at and len(copied) == 2:
        if fail_at == "kill":
            os._exit(9)
        raise RemoteError("injected: the remote went away mid-repack")
    copy(store, writer, pack_id, entries)
pack_repack.copy_pack = failing_copy
from vmkeep.interfaces.cli.app import main
sys.argv = ["vmkeep", *sys.argv[1:]]
main()
"""


def run_gc(
    cli: Cli, url: str, log: Path, fail_at: str = "", *args: str
) -> subprocess.CompletedProcess[str]:
    env = dict(cli.env, RUNS_LOG=str(log), FAIL_AT=fail_at)
    return subprocess.run(
        [PYTHON, "-c", SMALL_BUFFERS, "gc", "--remote", url, "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def in_memory_plan(cli: Cli, url: str) -> tuple[set[bytes], set[bytes], set[bytes], int]:
    """(delete, repack, keep, bytes of delete and repack) as gc decided before: a set of
    every live blob, a dict of every pack, plan_from."""
    with open_as_cli(cli, url) as repo:
        store = repo.packed
        assert store is not None
        referenced, _, problems = referenced_chunks(repo, SilentProgress())
        assert not problems
        live = needed_by(store, referenced)
        index = store.reload().index
        sizes = {p: o.size for o in store.remote.list("packs/") if (p := pack_id_of_name(o.name))}
        plan = plan_from(sizes, index.entries(), live, store.pack_size)
        freed = sum(sizes[p] for p in [*plan.delete, *plan.repack])
        return set(plan.delete), set(plan.repack), set(plan.keep), freed


def packs_listed(url: str) -> set[bytes]:
    return {p for o in open_remote(url).list("packs/") if (p := pack_id_of_name(o.name))}


def run_dirs(cli: Cli) -> list[Path]:
    return sorted(Path(cli.env["VMKEEP_CACHE_DIR"]).glob("*/gc/gc-live-*"))


def build(cli: Cli, tmp_path: Path) -> Repo:
    """test_format3_kills' repository (repacked and merged packs) plus whole dead packs: a
    point's own 2 MiB of blocks, overwritten by the next point, then forgotten."""
    repo = Repo(cli, str(tmp_path / "repo"), tmp_path).build()
    overwrite(repo.disk, 0, 2 * MiB, 7)
    doomed = repo.backup()
    overwrite(repo.disk, 0, 2 * MiB, 8)
    repo.backup()
    cli("forget", doomed, "--remote", repo.url)
    del repo.expected[doomed]
    return repo


def logged_runs(log: Path) -> list[int]:
    return [int(line.split()[0]) for line in log.read_text().splitlines()]


def runs_by_key_size(log: Path) -> dict[int, int]:
    """The most runs a sort of each key size spilled (32: the referenced chunk IDs and the
    packs the repack wrote, 72: their recipes' locations, 33: live keys, 73: live entries by
    pack, 40: the pack listing, 61: the per-pack tallies)."""
    most: dict[int, int] = {}
    for line in log.read_text().splitlines():
        runs, size = (int(f) for f in line.split()[:2])
        most[size] = max(runs, most.get(size, 0))
    return most


def indexed(cli: Cli, url: str) -> tuple[set[bytes], dict[tuple[int, bytes], bytes]]:
    """The chunk IDs the points reference, and every indexed blob (kind, ID) with its pack,
    read in this process from a fresh index."""
    with open_as_cli(cli, url) as repo:
        store = repo.packed
        assert store is not None
        referenced, _, problems = referenced_chunks(repo, SilentProgress())
        assert not problems
        entries = store.reload().index.entries()
        return referenced, {(e.kind, e.blob_id): e.pack for e in entries}


def needed_by(store: PackedStore, referenced: set[bytes]) -> set[tuple[int, bytes]]:
    """Every recipe and block the referenced chunks need (the in-memory mark of before)."""
    live = {(KIND_RECIPE, c) for c in referenced if c != ZERO_ID}
    for chunk_id in referenced - {ZERO_ID}:
        live.update((KIND_BLOCK, b) for b in store.recipe_of(chunk_id)[1] if b != ZERO_ID)
    return live


def live_blobs(cli: Cli, url: str, referenced: set[bytes]) -> set[tuple[int, bytes]]:
    with open_as_cli(cli, url) as repo:
        assert repo.packed is not None
        return needed_by(repo.packed, referenced)


def test_spilled_referenced_ids_keep_every_referenced_blob(cli: Cli, tmp_path: Path) -> None:
    """The mark's own sorts (referenced chunk IDs, their recipes' locations) spill several
    runs; gc still keeps every blob a point needs, drops the dead ones from the index and
    their dead packs from the remote, and counts what the set-based mark counted."""
    repo = build(cli, tmp_path)
    referenced, before = indexed(cli, repo.url)
    live = live_blobs(cli, repo.url, referenced)
    dead_recipes = {i for k, i in before if k == KIND_RECIPE} - referenced
    assert dead_recipes and live <= set(before)
    dead_packs = {p for b, p in before.items() if b not in live} - {
        p for b, p in before.items() if b in live
    }
    assert dead_packs <= packs_listed(repo.url)
    log = tmp_path / "runs.log"
    done = run_gc(cli, repo.url, log)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["chunks_kept"] == len(referenced)
    assert report["chunks_deleted"] == len(dead_recipes)
    most = runs_by_key_size(log)
    assert most[32] >= 3 and most[72] >= 2  # the mark's sorts really merged spilled runs
    assert run_dirs(cli) == []
    again, after = indexed(cli, repo.url)
    assert again == referenced
    assert set(after) == live  # every needed blob indexed, no dead one
    listed = packs_listed(repo.url)
    assert {after[b] for b in live} <= listed and not dead_packs & listed
    for point, hashes in repo.expected.items():
        assert restore_hashes(cli, tmp_path / "r", repo.url, point) == hashes


def test_streamed_gc_with_many_runs_equals_the_in_memory_plan(cli: Cli, tmp_path: Path) -> None:
    repo = build(cli, tmp_path)
    delete, repack, keep, freed = in_memory_plan(cli, repo.url)
    assert delete and len(repack) >= 3 and keep  # every fate is exercised
    before = packs_listed(repo.url)
    assert before == delete | repack | keep
    log = tmp_path / "runs.log"
    dry = run_gc(cli, repo.url, tmp_path / "dry.log", "", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    would = json.loads(dry.stdout)
    assert (would["packs_deleted"], would["packs_repacked"], would["bytes_freed"]) == (
        len(delete) + len(repack),
        len(repack),
        freed,
    )
    assert packs_listed(repo.url) == before and run_dirs(cli) == []
    done = run_gc(cli, repo.url, log)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["packs_repacked"] == len(repack)
    assert report["packs_deleted"] == len(delete) + len(repack)
    assert report["packs_written"] >= 1
    after = packs_listed(repo.url)
    assert keep <= after and not (delete | repack) & after
    assert len(after - before) == report["packs_written"]
    assert min(logged_runs(log)) >= 2  # every sort really merged spilled runs
    most = runs_by_key_size(log)
    assert all(most[size] >= 3 for size in (32, 33, 40, 61, 72, 73)), most
    assert run_dirs(cli) == []
    assert cli("verify", "--remote", repo.url, "--json").json()["ok"]
    for point, hashes in repo.expected.items():
        assert restore_hashes(cli, tmp_path / "r", repo.url, point) == hashes
    again = cli("gc", "--remote", repo.url, "--json").json()
    assert again["packs_deleted"] == 0 and again["packs_written"] == 0


def test_run_files_are_removed_after_a_failure_and_after_a_kill(cli: Cli, tmp_path: Path) -> None:
    repo = build(cli, tmp_path)
    before = packs_listed(repo.url)
    log = tmp_path / "runs.log"
    killed = run_gc(cli, repo.url, log, "kill")
    assert killed.returncode == 9, killed.stderr
    left = run_dirs(cli)
    # A kill cannot clean up: the live keys, the listing and the tallies were removed once
    # read; the entries sorted by pack with the plan's rows, and the repack's written packs
    # were left.
    assert len(left) == 2 and any((d / "plan").is_file() for d in left)
    failed = run_gc(cli, repo.url, log, "error")
    assert failed.returncode not in (0, 70) and "Traceback" not in failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "mid-repack" in lines[-1]
    assert run_dirs(cli) == []  # its own removed on the error, the killed one's at its start
    assert packs_listed(repo.url) >= before  # neither run deleted anything
    for point, hashes in repo.expected.items():
        assert restore_hashes(cli, tmp_path / "r", repo.url, point) == hashes
    done = run_gc(cli, repo.url, log)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["packs_repacked"] >= 3
    assert run_dirs(cli) == []
    for point, hashes in repo.expected.items():
        assert restore_hashes(cli, tmp_path / "r2", repo.url, point) == hashes
