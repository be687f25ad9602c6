"""A version 2 manifest object (docs/FORMAT.md §5.5) on a real S3 server (SeaweedFS): stored
from its file by a streamed create-if-absent PUT (remotes/s3_file_put.py; the bytes fallback
where the server cannot write conditionally), read back by ranged GETs (header, tail, head,
then one GET per piece) equal to what was saved."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.remotes.s3_server import lose_first_put_answer
from tests.remotes.test_s3 import prefix, remote, server  # noqa: F401 (fixtures)
from tests.repository.table_points import CHUNK, random_runs, small_tables, synthetic_point
from vmkeep.errors import ObjectExistsError
from vmkeep.remotes.base import put_file
from vmkeep.remotes.s3 import S3Remote
from vmkeep.repository import manifest_v2
from vmkeep.repository.manifest_table import TableReader
from vmkeep.repository.repository import Repository


@pytest.mark.parametrize("conditional", [True, False])
def test_a_table_point_on_s3(
    remote: S3Remote,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    conditional: bool,
) -> None:
    small_tables(monkeypatch)
    monkeypatch.setattr(manifest_v2, "WHOLE_READ", 0)  # ranged reads, as for a huge object
    repo = Repository.init(
        remote, "aes-256-gcm", lambda: b"s3 table", CHUNK, 3, CHUNK, pack_size=1 << 20
    )
    point = synthetic_point([("big", 40 * CHUNK, random_runs(1, [(0, 9), (20, 7)]))])
    remote._conditional_put = conditional  # False: as a server without If-None-Match
    bytes_puts: list[str] = []
    real_put = S3Remote.put

    def put(self: S3Remote, name: str, data: bytes, *, overwrite: bool = True) -> None:
        bytes_puts.append(name)
        real_put(self, name, data, overwrite=overwrite)

    monkeypatch.setattr(S3Remote, "put", put)
    repo.save_manifest(point)
    assert bytes_puts == ([] if conditional else [f"manifests/{point.id}"])
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


def test_lost_answer_of_a_streamed_put_is_not_a_conflict(
    remote: S3Remote,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The streamed PUT landed but its answer was lost: the retry's 412 is ours (the ETag is
    the file's MD5), the body is sent whole again from the file's start; another file under
    the same name is a conflict."""
    attempts = lose_first_put_answer(remote)
    body = os.urandom(3 << 20)
    (tmp_path / "m").write_bytes(body)
    with open(tmp_path / "m", "rb") as f:
        put_file(remote, "manifests/m", f, len(body))
    assert attempts[0] == 2 and remote.get("manifests/m") == body
    (tmp_path / "n").write_bytes(b"someone else's")
    with open(tmp_path / "n", "rb") as f, pytest.raises(ObjectExistsError):
        put_file(remote, "manifests/m", f, 14)
