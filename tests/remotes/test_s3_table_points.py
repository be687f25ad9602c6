"""A version 2 manifest object (docs/FORMAT.md §5.5) on a real S3 server (SeaweedFS): stored
from its file by the bytes fallback (remotes.base.put_file) with create-if-absent, read back
by ranged GETs (header, tail, head, then one GET per piece) equal to what was saved."""

from __future__ import annotations

from typing import Any

import pytest

from tests.remotes.test_s3 import prefix, remote, server  # noqa: F401 (fixtures)
from tests.repository.table_points import CHUNK, random_runs, small_tables, synthetic_point
from vmkeep.errors import ObjectExistsError
from vmkeep.remotes.base import put_file
from vmkeep.remotes.s3 import S3Remote
from vmkeep.repository import manifest_v2
from vmkeep.repository.manifest_table import TableReader
from vmkeep.repository.repository import Repository


def test_a_table_point_on_s3(remote: S3Remote, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    small_tables(monkeypatch)
    monkeypatch.setattr(manifest_v2, "WHOLE_READ", 0)  # ranged reads, as for a huge object
    repo = Repository.init(
        remote, "aes-256-gcm", lambda: b"s3 table", CHUNK, 3, CHUNK, pack_size=1 << 20
    )
    point = synthetic_point([("big", 40 * CHUNK, random_runs(1, [(0, 9), (20, 7)]))])
    repo.save_manifest(point)
    gets: list[Any] = []
    remote._client.meta.events.register(
        "before-parameter-build.s3.GetObject", lambda params, **_: gets.append(params.get("Range"))
    )
    loaded = repo.load_manifest(point.id)
    assert len(gets) == 3 and all(r is not None for r in gets)  # header, tail, head
    disk = loaded.disks[0]
    assert isinstance(disk.table, TableReader)
    assert list(disk.entries()) == list(point.disks[0].entries())
    assert len(gets) == 3 + len(disk.table.pieces)
    with pytest.raises(ObjectExistsError):  # create-if-absent, as every manifest
        manifest_v2.save_object(remote, repo.sealer, point)
    with pytest.raises(ObjectExistsError), open(__file__, "rb") as f:
        put_file(remote, f"manifests/{point.id}", f, 10)
