"""Constants of repository format v1 (docs/FORMAT.md). Changing any of them bumps FORMAT_VERSION."""

from __future__ import annotations

FORMAT_VERSION = 1
CHUNK_SIZE = 4 * 1024 * 1024
ID_SIZE = 32
ZERO_ID = bytes(ID_SIZE)  # index entry of an all-zero chunk, which is never stored
ZERO_CHUNK = bytes(CHUNK_SIZE)


def is_zero(data: bytes) -> bool:
    """One memcmp against a shared zero buffer (chunks are at most CHUNK_SIZE long)."""
    return data == (ZERO_CHUNK if len(data) == CHUNK_SIZE else bytes(len(data)))


CONFIG_NAME = "config"
CHUNKS_PREFIX = "chunks/"
MANIFESTS_PREFIX = "manifests/"
LOCKS_PREFIX = "locks/"

CHUNK_MAGIC = b"VMKC"
MANIFEST_MAGIC = b"VMKM"
HEADER_SIZE = 8  # magic(4) version(1) flags(1) reserved(2)
FLAG_ZSTD = 0x01
FLAG_ENCRYPTED = 0x02
NONCE_SIZE = 12
TAG_SIZE = 16


def chunk_object_name(chunk_id: bytes) -> str:
    hexid = chunk_id.hex()
    return f"{CHUNKS_PREFIX}{hexid[:2]}/{hexid}"


def manifest_object_name(point_id: str) -> str:
    return f"{MANIFESTS_PREFIX}{point_id}"


def header(magic: bytes, flags: int) -> bytes:
    return magic + bytes((FORMAT_VERSION, flags, 0, 0))
