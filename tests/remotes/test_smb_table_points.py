"""A version 2 manifest object (docs/FORMAT.md §5.5) on a real Samba share: stored by a
create-if-absent put streamed from its file (SmbRemote.put_file: each WRITE read from the
file), read back by ranges equal to what was saved; a lost answer of the put is recognised
by comparing the object with the file, another file under the name is a conflict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.remotes.test_smb import remote, server  # noqa: F401 (fixtures)
from tests.repository.table_points import CHUNK, random_runs, small_tables, synthetic_point
from vmkeep.errors import ObjectExistsError
from vmkeep.remotes.base import put_file
from vmkeep.remotes.smb import files as smb_files
from vmkeep.remotes.smb.remote import SmbRemote
from vmkeep.repository import manifest_v2
from vmkeep.repository.manifest_table import TableReader
from vmkeep.repository.repository import Repository


def test_a_table_point_on_smb(remote: SmbRemote, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    small_tables(monkeypatch)
    monkeypatch.setattr(manifest_v2, "WHOLE_READ", 0)  # ranged reads, as for a huge object
    repo = Repository.init(remote, "none", lambda: b"x", CHUNK, 3, CHUNK, pack_size=1 << 20)
    point = synthetic_point([("big", 40 * CHUNK, random_runs(2, [(0, 9), (20, 7)]))])
    puts: list[str] = []
    real_put = SmbRemote.put

    def put(self: SmbRemote, name: str, data: bytes, *, overwrite: bool = True) -> None:
        puts.append(name)
        real_put(self, name, data, overwrite=overwrite)

    monkeypatch.setattr(SmbRemote, "put", put)
    repo.save_manifest(point)
    assert not [n for n in puts if n.startswith("manifests/")]  # streamed, not put as bytes
    disk = repo.load_manifest(point.id).disks[0]
    assert isinstance(disk.table, TableReader) and len(disk.table.pieces) >= 4
    assert list(disk.entries()) == list(point.disks[0].entries())
    with pytest.raises(ObjectExistsError):
        manifest_v2.save_object(remote, repo.sealer, point)


def test_lost_answer_of_a_streamed_put(
    remote: SmbRemote,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The put landed (several WRITEs: 3 MiB) but the connection broke before its answer:
    the retry's 'exists' is our own object, by content; another file is a conflict."""
    real = smb_files.ShareFiles.write
    calls = [0]

    def write(self: smb_files.ShareFiles, *args: Any) -> None:
        calls[0] += 1
        real(self, *args)
        if calls[0] == 1:
            args[-1]["sent"] = True
            raise ConnectionResetError("answer lost")

    monkeypatch.setattr(smb_files.ShareFiles, "write", write)
    body = os.urandom(3 << 20)
    (tmp_path / "m").write_bytes(body)
    with open(tmp_path / "m", "rb") as f:
        put_file(remote, "manifests/m", f, len(body))
    assert calls[0] == 2 and remote.get("manifests/m") == body
    (tmp_path / "n").write_bytes(body[:-1] + bytes([body[-1] ^ 1]))
    calls[0] = 1  # no more lost answers
    with open(tmp_path / "n", "rb") as f, pytest.raises(ObjectExistsError):
        put_file(remote, "manifests/m", f, len(body))
