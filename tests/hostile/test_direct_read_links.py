"""Whoever can write the remote's directory swaps a pack for a symlink to a file outside the
repository: a direct read (the restore's, LocalRemote.get_direct) refuses it as a corrupt
object, as `get` does, and never reads the link's target."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from vmkeep.errors import IntegrityError
from vmkeep.remotes.local import LocalRemote

NAME = "packs/ab/ab" + "1" * 62


def test_a_pack_swapped_for_a_link_is_not_read_directly(tmp_path: Path) -> None:
    secret = tmp_path / "outside"
    secret.write_bytes(b"not the repository's" * 500)
    remote = LocalRemote(tmp_path / "repo")
    remote.put(NAME, b"pack bytes" * 1000)
    pack = tmp_path / "repo" / NAME
    pack.unlink()
    pack.symlink_to(secret)
    buf = memoryview(mmap.mmap(-1, 8192))
    with pytest.raises(IntegrityError, match="not a regular file"):
        remote.get_direct(NAME, 0, buf)
    assert bytes(buf[:20]) == bytes(20)  # nothing of the target was read into the buffer
