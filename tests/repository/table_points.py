"""Helpers for version 2 manifest objects (docs/FORMAT.md §5.5) in tests: a format 3
repository, the table threshold and piece size lowered so that small disks make tables of
several pieces, synthetic points, and a forger that rewrites an unencrypted object's head or
pieces the way an attacker who can write the remote would (recomputing the checksums)."""

from __future__ import annotations

import json
import os
import random
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import zstandard

from vmkeep.operations import backup
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository import manifest, manifest_table
from vmkeep.repository.crypto import Sealer
from vmkeep.repository.format import HEADER_SIZE, ID_SIZE, manifest_object_name
from vmkeep.repository.manifest import DiskIndex, Manifest, new_point_id
from vmkeep.repository.manifest_table import RECORD, TAIL, piece_aad
from vmkeep.repository.repository import Repository

CHUNK = 64 << 10
PIECE_IDS = 4  # a piece holds 4 IDs (128 bytes) in tests
THRESHOLD = 8  # a disk of more than 8 stored IDs is kept in a table


def small_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables of a few IDs and pieces of PIECE_IDS: every constant read at call time."""
    monkeypatch.setattr(manifest_table, "TABLE_INLINE_MAX_IDS", THRESHOLD)
    monkeypatch.setattr(manifest, "TABLE_INLINE_MAX_IDS", THRESHOLD)
    monkeypatch.setattr(manifest_table, "PIECE_IDS", PIECE_IDS)
    monkeypatch.setattr(manifest_table, "PIECE_BYTES", RECORD.size + PIECE_IDS * ID_SIZE)
    monkeypatch.setattr(
        manifest_table,
        "MAX_PIECE",
        RECORD.size + PIECE_IDS * ID_SIZE + manifest_table.SEAL_OVERHEAD,
    )
    monkeypatch.setattr(backup, "TABLE_INLINE_MAX_IDS", THRESHOLD)


def packed_repo(root: Path, encryption: str = "none") -> Repository:
    return Repository.init(
        LocalRemote(root),
        encryption,
        lambda: b"table test passphrase",
        chunk_size=CHUNK,
        format_version=3,
        block_size=CHUNK,
        pack_size=1 << 20,
    )


def random_runs(seed: int, runs: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    """Runs of random (fake) IDs: (first, count) each."""
    rnd = random.Random(seed)
    return [(first, rnd.randbytes(n * ID_SIZE)) for first, n in runs]


def synthetic_point(disks: list[tuple[str, int, list[tuple[int, bytes]]]]) -> Manifest:
    """A point of disks (name, size, runs) with fake IDs (nothing stored: object tests only)."""
    now = datetime.now(UTC)
    return Manifest(
        id=new_point_id(now),
        vm={"name": "big", "uuid": "u-1", "vcpus": 1, "memory": 1, "metadata": {}},
        disks=[DiskIndex(n, s, "raw", runs, chunk_size=CHUNK) for n, s, runs in disks],
        mode="full",
        created=now,
        finished=now,
    )


def object_path(root: Path, point_id: str) -> Path:
    return root / manifest_object_name(point_id)


class Forged:
    """An unencrypted version 2 object taken apart: header, pieces region, head document."""

    def __init__(self, path: Path, point_id: str) -> None:
        self.path, self.point = path, point_id
        data = path.read_bytes()
        self.header = data[:HEADER_SIZE]
        (length,) = TAIL.unpack(data[-TAIL.size :])
        start = len(data) - TAIL.size - length
        self.region = data[HEADER_SIZE:start]
        sealed = data[start : start + length - 32]  # unencrypted: plaintext || BLAKE3
        self.doc: dict[str, Any] = json.loads(zstandard.ZstdDecompressor().decompress(sealed))

    def table(self, disk: int) -> dict[str, Any]:
        table: dict[str, Any] = self.doc["disks"][disk]["table"]
        return table

    def piece(self, disk: int, number: int) -> bytes:
        _, _, offset, length = self.table(disk)["pieces"][number]
        return self.region[offset - HEADER_SIZE : offset - HEADER_SIZE + length]

    def reseal_piece(self, disk: int, number: int, plain: bytes) -> bytes:
        """A piece of `plain` with a valid checksum for its place (the forger's power)."""
        aad = piece_aad(self.header, self.point, disk, number)
        return b"".join(Sealer(None).seal_parts(b"", plain, aad).take())

    def write(self, region: bytes | None = None, tail: bytes | None = None) -> None:
        """The object with `region` (default: as read) and the head of `self.doc` resealed."""
        text = json.dumps(self.doc, separators=(",", ":")).encode()
        packed = zstandard.ZstdCompressor().compress(text)
        aad = self.header + manifest_object_name(self.point).encode()
        head = b"".join(Sealer(None).seal_parts(b"", packed, aad).take())
        body = self.header + (self.region if region is None else region) + head
        self.path.write_bytes(body + (TAIL.pack(len(head)) if tail is None else tail))


def plain_piece(records: list[tuple[int, int, bytes]]) -> bytes:
    """Records (first, count, ids) as a piece's plaintext (count may lie)."""
    return b"".join(struct.pack("<QI", f, n) + ids for f, n, ids in records)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
        os.fsync(f.fileno())
