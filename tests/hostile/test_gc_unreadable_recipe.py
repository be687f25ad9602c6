"""gc's mark streams the referenced chunk IDs through an external sort: a recipe a point
references that cannot be read (its bytes changed in its pack by whoever writes the remote)
must still stop gc before anything is deleted, with one `error:` line, and leave no run
files behind."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import open_as_cli
from tests.e2e.test_format3_gc_streamed import packs_listed, run_dirs
from tests.e2e.test_format3_kills import Repo
from vmkeep.progress import SilentProgress
from vmkeep.repository.blobs import KIND_RECIPE
from vmkeep.repository.format import ZERO_ID
from vmkeep.repository.manifest_stream import referenced_chunks
from vmkeep.repository.packs import pack_object_name

from .conftest import Cli, one_error_line


def damage_a_referenced_recipe(cli: Cli, url: str) -> None:
    """Flips one byte in the middle of the sealed recipe of a chunk a point references."""
    with open_as_cli(cli, url) as repo:
        store = repo.packed
        assert store is not None
        referenced, _, problems = referenced_chunks(repo, SilentProgress())
        assert not problems
        index = store.reload().index
        entry = index.get(KIND_RECIPE, max(referenced - {ZERO_ID}))
        assert entry is not None
    path = Path(url) / pack_object_name(entry.pack)
    data = bytearray(path.read_bytes())
    data[entry.offset + entry.length // 2] ^= 0x20
    path.write_bytes(bytes(data))


def test_gc_stops_on_an_unreadable_referenced_recipe(cli: Cli, tmp_path: Path) -> None:
    repo = Repo(cli, str(tmp_path / "repo"), tmp_path).build()  # garbage of every kind
    dry = cli("gc", "--remote", repo.url, "--dry-run", "--json").json()
    assert dry["packs_deleted"] > 0  # a gc that ran would delete something
    damage_a_referenced_recipe(cli, repo.url)
    before = packs_listed(repo.url)
    index_before = sorted(p.name for p in (Path(repo.url) / "index").iterdir())
    line = one_error_line(cli("gc", "--remote", repo.url, ok=False))
    assert "gc refuses to run" in line and "cannot be told apart from garbage" in line
    assert packs_listed(repo.url) == before
    assert sorted(p.name for p in (Path(repo.url) / "index").iterdir()) == index_before
    assert run_dirs(cli) == []
