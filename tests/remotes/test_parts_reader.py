"""remotes/parts_reader.py: an object's pieces read at any offset, and as one stream, as an
SDK reads a PUT's body (from the start, again for each retry, or once to checksum it)."""

from __future__ import annotations

import io
import os
import random

import pytest

from tests.remotes.s3_server import lose_first_put_answer
from tests.remotes.test_s3 import prefix, remote, server  # noqa: F401 (fixtures)
from vmkeep.remotes.base import put_parts
from vmkeep.remotes.parts_reader import Parts, parts_file
from vmkeep.remotes.s3 import S3Remote


def _parts(seed: int) -> list[bytes | memoryview]:
    rng = random.Random(seed)
    out: list[bytes | memoryview] = []
    for _ in range(rng.randrange(1, 12)):
        size = rng.choice([0, 0, 1, 7, 4096, rng.randrange(1, 70000)])
        data = rng.randbytes(size + 3)
        out.append(memoryview(data)[3:] if rng.random() < 0.3 else data[3:])
    return out


@pytest.mark.parametrize("seed", range(40))
def test_reads_equal_the_joined_parts(seed: int) -> None:
    parts = _parts(seed)
    whole = b"".join(parts)
    reader = parts_file(parts)
    source = Parts(parts)
    assert source.size == len(whole)
    assert reader.read() == whole
    assert reader.read(10) == b""  # at the end
    rng = random.Random(seed)
    for _ in range(20):
        at = rng.randrange(0, len(whole) + 5)
        n = rng.randrange(0, 9000)
        assert source.pread(at, n) == whole[at : at + n]
        reader.seek(at)
        assert reader.read(n) == whole[at : at + n]
        assert reader.tell() == min(at + n, max(at, len(whole)))
    if len(whole) >= 3:
        reader.seek(-3, io.SEEK_END)
        assert reader.read() == whole[-3:]


def test_reading_in_small_pieces_as_http_client_does() -> None:
    parts = [os.urandom(10000), b"", memoryview(os.urandom(5000)), os.urandom(1)]
    reader = parts_file(parts)
    got = bytearray()
    while block := reader.read(8192):
        got += block
    assert bytes(got) == b"".join(parts)
    reader.seek(0)  # a retry sends it all again
    assert reader.read() == b"".join(parts)


def test_bad_seeks() -> None:
    reader = parts_file([b"abc"])
    with pytest.raises(ValueError):
        reader.seek(-1)
    assert reader.seek(10) == 10 and reader.read() == b""
    assert reader.seek(-1, io.SEEK_CUR) == 9


def test_a_pack_put_to_s3_whose_answer_was_lost_is_sent_whole_again(
    remote: S3Remote,  # noqa: F811
) -> None:
    """S3Remote.put_parts: the retry after a lost answer sends the body from its start (a
    retry that went on from where the first attempt stopped would store a cut object)."""
    attempts = lose_first_put_answer(remote)
    parts: list[bytes] = [os.urandom(3 << 20), b"", os.urandom(12345)]
    whole = b"".join(parts)
    put_parts(remote, "packs/ab/cd", parts)
    assert attempts[0] == 2
    assert remote.get("packs/ab/cd") == whole
