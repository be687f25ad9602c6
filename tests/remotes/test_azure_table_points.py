"""A version 2 manifest object (docs/FORMAT.md §5.5) on Azurite: stored by a create-if-absent
upload read from its file (AzureRemote.put_file: one PUT, or staged blocks committed only if
the name is free), read back by ranges equal to what was saved; a second writer of the name
is refused, with one PUT and with staged blocks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.remotes.azure_server import AzuriteServer
from tests.remotes.test_azure import _no_azure_env, _remote, azurite, container  # noqa: F401
from tests.repository.table_points import CHUNK, random_runs, small_tables, synthetic_point
from vmkeep.errors import ObjectExistsError
from vmkeep.remotes import azure
from vmkeep.remotes.azure import AzureRemote
from vmkeep.remotes.base import put_file
from vmkeep.repository import manifest_v2
from vmkeep.repository.manifest_table import TableReader
from vmkeep.repository.repository import Repository


@pytest.mark.parametrize("staged", [False, True])
def test_a_table_point_on_azure(
    azurite: AzuriteServer,  # noqa: F811
    container: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    staged: bool,
) -> None:
    small_tables(monkeypatch)
    monkeypatch.setattr(manifest_v2, "WHOLE_READ", 0)  # ranged reads, as for a huge object
    if staged:  # above one PUT: blocks staged from the file, then a conditional commit
        monkeypatch.setattr(azure, "MAX_SINGLE_PUT", 1 << 20)
    remote = _remote(azurite, container)
    puts: list[str] = []
    real_put = AzureRemote.put

    def put(self: AzureRemote, name: str, data: bytes, *, overwrite: bool = True) -> None:
        puts.append(name)
        real_put(self, name, data, overwrite=overwrite)

    monkeypatch.setattr(AzureRemote, "put", put)
    repo = Repository.init(remote, "none", lambda: b"x", CHUNK, 3, CHUNK, pack_size=1 << 20)
    point = synthetic_point([("big", 40 * CHUNK, random_runs(3, [(0, 9), (20, 7)]))])
    repo.save_manifest(point)
    assert not [n for n in puts if n.startswith("manifests/")]  # from the file, not bytes
    disk = repo.load_manifest(point.id).disks[0]
    assert isinstance(disk.table, TableReader) and len(disk.table.pieces) >= 4
    assert list(disk.entries()) == list(point.disks[0].entries())
    with pytest.raises(ObjectExistsError):
        manifest_v2.save_object(remote, repo.sealer, point)
    body = os.urandom(3 << 20)
    (tmp_path / "m").write_bytes(body)
    with open(tmp_path / "m", "rb") as f:
        put_file(remote, "manifests/m", f, len(body))
        assert remote.get("manifests/m") == body
        with pytest.raises(ObjectExistsError):
            put_file(remote, "manifests/m", f, len(body))
