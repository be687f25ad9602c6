"""A corrupt object on a real object store (SeaweedFS, Azurite) read through the restore
pipeline, version 1 and format 3: an IntegrityError, never wrong bytes, nothing restored."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.operations.test_restore_pipeline import (  # noqa: F401 (fixtures)
    _backed_up,
    _restored,
    azurite,
    seaweed,
)
from vmkeep.errors import IntegrityError
from vmkeep.repository.format import CHUNKS_PREFIX
from vmkeep.repository.packs import PACKS_PREFIX


@pytest.mark.parametrize("fmt", [1, 3])
@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_a_corrupt_object_is_an_integrity_error_not_wrong_bytes(
    kind: str,
    fmt: int,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, remote, point, _ = _backed_up(kind, fmt, tmp_path, request, monkeypatch)
    prefix = CHUNKS_PREFIX if fmt == 1 else PACKS_PREFIX
    names = sorted(o.name for o in remote.list(prefix))
    victim = max(names, key=lambda n: remote.stat(n).size)  # a data pack / a random chunk
    data = bytearray(remote.get(victim))
    data[len(data) // 2] ^= 0x40  # one bit, in the middle of a block's ciphertext
    remote.put(victim, bytes(data))
    where = tmp_path / "out"
    with pytest.raises(IntegrityError, match="corrupt"):
        _restored(repo, point, where)
    assert list(where.iterdir()) == []  # nothing restored lists as a VM
