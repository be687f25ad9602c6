"""Dedup of format 3 blocks stays exact with one index lookup per block (PackWriter.missing,
then add at the generation it returned): a block the repository holds is never stored
again, whether its index file is on disk (a populated index) or its pack was indexed between
the lookup and the add; an empty index file is not probed, a populated one is."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

from tests.conftest import PASSPHRASE
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.blobs import KIND_BLOCK
from vmkeep.repository.packs import PACKS_PREFIX, read_trailer
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, 1 << 20


def packed_repo(path: Path) -> Repository:
    return Repository.init(
        LocalRemote(str(path)), "aes-256-gcm", lambda: PASSPHRASE, format_version=3, pack_size=MiB
    )


def reopen(path: Path) -> Repository:
    return Repository.open(LocalRemote(str(path)), lambda: PASSPHRASE)


def store(repo: Repository, data: bytes) -> bytes:
    chunk_id = repo.chunk_id(data)
    repo.put_chunk(chunk_id, data, 1)
    repo.flush_chunks()
    return chunk_id


def stored_blocks(repo: Repository, root: Path) -> Counter[bytes]:
    """How many times each block ID lies in a pack on the remote (every trailer read)."""
    counts: Counter[bytes] = Counter()
    for path in (root / PACKS_PREFIX).rglob("*"):
        if path.is_file():
            for e in read_trailer(repo.sealer, bytes.fromhex(path.name), path.read_bytes()):
                if e.kind == KIND_BLOCK:
                    counts[e.blob_id] += 1
    return counts


def test_blocks_in_a_populated_index_are_not_stored_again(tmp_path: Path) -> None:
    rng = random.Random(7)
    first = rng.randbytes(4 * MiB)
    root = tmp_path / "r"
    store(packed_repo(root), first)
    repo = reopen(root)  # a new process: the first chunk's blocks are in the index file
    index = repo.packed.index() if repo.packed else None
    assert index is not None
    old_ids = repo.packed.codec.block_ids(first) if repo.packed else []
    assert all((KIND_BLOCK, b) in index for b in old_ids)  # the file is probed, not skipped
    assert (KIND_BLOCK, os.urandom(32)) not in index
    before = sum(p.stat().st_size for p in (root / PACKS_PREFIX).rglob("*") if p.is_file())
    second = first[: 2 * MiB] + rng.randbytes(2 * MiB)  # 32 old blocks, 32 new
    chunk_id = store(repo, second)
    counts = stored_blocks(repo, root)
    assert len(counts) == 64 + 32 and set(counts.values()) == {1}
    after = sum(p.stat().st_size for p in (root / PACKS_PREFIX).rglob("*") if p.is_file())
    # 32 new random blocks (stored raw: 64 KiB + 36 bytes each), a recipe, pack overheads
    assert 32 * (64 * KiB + 36) < after - before < 32 * (64 * KiB + 36) + 16 * KiB
    assert reopen(root).get_chunk(chunk_id) == second


def test_a_block_indexed_between_lookup_and_add_is_not_stored_twice(tmp_path: Path) -> None:
    """Another worker's pack with the same block is uploaded and indexed after this worker
    looked the block up: the generation moved, so add looks in the index again."""
    root = tmp_path / "r"
    repo = packed_repo(root)
    store = repo.packed
    assert store is not None
    writer = store.writer
    plain = random.Random(8).randbytes(64 * KiB)
    (block_id,) = store.codec.block_ids(plain)
    ((_, sealed_a),) = store.codec.encode_many(KIND_BLOCK, [(block_id, plain)], 1)
    ((_, sealed_b),) = store.codec.encode_many(KIND_BLOCK, [(block_id, plain)], 1)
    new, generation = writer.missing(KIND_BLOCK, [block_id, block_id])
    assert new == [block_id]  # asked twice, reported once
    assert writer.add(KIND_BLOCK, [(block_id, sealed_a)]) > 0  # the other worker
    writer.flush()  # its pack uploaded and indexed: out of the in-flight set
    assert writer.generation != generation
    assert writer.add(KIND_BLOCK, [(block_id, sealed_b)], generation) == 0
    writer.flush()
    assert stored_blocks(repo, root) == Counter({block_id: 1})


def test_a_block_in_flight_at_the_same_generation_is_added_once(tmp_path: Path) -> None:
    """Two workers look the same new block up before either adds it: the first add stores
    it, the second (same generation, so no index lookup) finds it in the in-flight set."""
    root = tmp_path / "r"
    repo = packed_repo(root)
    store = repo.packed
    assert store is not None
    writer = store.writer
    plains = [random.Random(9 + k).randbytes(64 * KiB) for k in range(2)]
    ids = [store.codec.block_ids(p)[0] for p in plains]
    sealed = store.codec.encode_many(KIND_BLOCK, list(zip(ids, plains, strict=True)), 1)
    first, gen_a = writer.missing(KIND_BLOCK, ids)
    second, gen_b = writer.missing(KIND_BLOCK, ids[:1])
    assert first == ids and second == ids[:1] and gen_a == gen_b == writer.generation
    assert writer.add(KIND_BLOCK, sealed, gen_a) == sum(len(s) for _, s in sealed)
    assert writer.add(KIND_BLOCK, sealed[:1], gen_b) == 0
    assert writer.missing(KIND_BLOCK, ids)[0] == []  # in flight: not missing
    writer.flush()
    assert writer.missing(KIND_BLOCK, ids)[0] == []  # indexed: not missing
    assert stored_blocks(repo, root) == Counter({ids[0]: 1, ids[1]: 1})
