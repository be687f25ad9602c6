"""Chunk objects: header, optional zstd, optional AES-256-GCM (docs/FORMAT.md, "Chunk object")."""

from __future__ import annotations

from vmkeep.errors import IntegrityError

from .compression import compress_if_smaller, decompress
from .crypto import Sealed, Sealer
from .format import (
    CHUNK_MAGIC,
    FLAG_ENCRYPTED,
    FLAG_ZSTD,
    HEADER_SIZE,
    OBJECT_VERSION,
    header,
)


def encode_chunk(sealer: Sealer, chunk_id: bytes, data: bytes, level: int) -> Sealed:
    """The chunk object as pieces (crypto.Sealed): store_chunk writes them without a join."""
    payload, compressed = compress_if_smaller(data, level) if level > 0 else (data, False)
    flags = (FLAG_ZSTD if compressed else 0) | (FLAG_ENCRYPTED if sealer.encrypted else 0)
    head = header(CHUNK_MAGIC, flags)
    if sealer.encrypted:
        return sealer.seal_parts(head, payload, head + chunk_id)
    return Sealed((head, bytes(payload)))


def decode_chunk(sealer: Sealer, chunk_id: bytes, blob: bytes, max_size: int) -> bytes:
    """Return the plaintext, or raise IntegrityError: the stored bytes must hash to `chunk_id`
    and be no longer than the repository's chunk size (a longer one would spill over the next
    chunk's range of a restored disk)."""
    what = f"chunk {chunk_id.hex()[:16]}"
    head = blob[:HEADER_SIZE]
    if len(head) < HEADER_SIZE or head[:4] != CHUNK_MAGIC or head[4] != OBJECT_VERSION:
        raise IntegrityError(f"{what} is corrupt: bad header")
    flags = head[5]
    if bool(flags & FLAG_ENCRYPTED) != sealer.encrypted or flags & ~(FLAG_ZSTD | FLAG_ENCRYPTED):
        raise IntegrityError(f"{what} is corrupt: unexpected flags {flags:#x}")
    payload: bytes | memoryview = memoryview(blob)[HEADER_SIZE:]  # no 4 MiB copy
    if sealer.encrypted:
        payload = sealer.open(payload, head + chunk_id, what)
    data = decompress(payload, what, max_size) if flags & FLAG_ZSTD else payload
    if len(data) > max_size:
        raise IntegrityError(
            f"{what} is corrupt: {len(data)} bytes, more than the chunk size {max_size}"
        )
    if sealer.chunk_id(data) != chunk_id:
        raise IntegrityError(f"{what} is corrupt: content does not match its ID")
    return data if isinstance(data, bytes) else bytes(data)
