"""Blobs of a format 3 repository: blocks and recipes (docs/FORMAT.md §13.3, §13.4).

A chunk is cut into fixed blocks; its recipe lists their IDs, and the chunk ID a manifest
carries is the keyed BLAKE3 of the recipe under a key of its own (a Merkle node), so a
chunk whose one block changed stores that block and a ~1 KiB recipe, not the whole chunk."""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable

import blake3

from vmkeep.errors import IntegrityError

from .compression import compress_if_smaller, decompress
from .crypto import Sealed, Sealer
from .format import (
    FLAG_ENCRYPTED,
    FLAG_ZSTD,
    HEADER_SIZE,
    ID_SIZE,
    NONCE_SIZE,
    OBJECT_VERSION,
    TAG_SIZE,
    ZERO_ID,
    header,
)

KIND_BLOCK = 1
KIND_RECIPE = 2
KINDS = (KIND_BLOCK, KIND_RECIPE)
MAGICS = {KIND_BLOCK: b"VMKB", KIND_RECIPE: b"VMKR"}
KIND_NAMES = {KIND_BLOCK: "block", KIND_RECIPE: "recipe"}
RECIPE_CONTEXT = "vmkeep 2026-12 chunk recipe ID v1"
BLOB_OVERHEAD = HEADER_SIZE + NONCE_SIZE + TAG_SIZE  # stored forms are never compressed larger
_LENGTH = struct.Struct("<I")


def recipe_size(chunk_size: int, block_size: int) -> int:
    """The largest recipe plaintext: its length field and one ID per block."""
    return _LENGTH.size + ID_SIZE * (-(-chunk_size // block_size))


class BlobCodec:
    """IDs, encoding and decoding of blobs for one repository (its key and sizes)."""

    def __init__(self, sealer: Sealer, chunk_size: int, block_size: int) -> None:
        self.sealer = sealer
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.max_plain = {KIND_BLOCK: block_size, KIND_RECIPE: recipe_size(chunk_size, block_size)}
        key = sealer.key
        self._recipe_key = (
            blake3.blake3(key.id_key, derive_key_context=RECIPE_CONTEXT).digest()
            if key is not None
            else None
        )

    def max_encoded(self, kind: int) -> int:
        return self.max_plain[kind] + BLOB_OVERHEAD

    # -- IDs ------------------------------------------------------------------

    def block_ids(self, data: bytes) -> list[bytes]:
        """The IDs of a chunk's blocks, zero IDs for all-zero blocks."""
        view = memoryview(data)
        step = self.block_size
        size = len(data)
        zeros = _zeros(step)
        chunk_id = self.sealer.chunk_id
        ids = []
        for start in range(0, size, step):
            end = min(start + step, size)
            # startswith compares in place: a slice of `data` copied each block first
            zero = data[start] == 0 and data.startswith(zeros[: end - start], start)
            ids.append(ZERO_ID if zero else chunk_id(view[start:end]))
        return ids

    def recipe(self, length: int, block_ids: list[bytes]) -> bytes:
        return _LENGTH.pack(length) + b"".join(block_ids)

    def recipe_id(self, recipe: bytes | memoryview) -> bytes:
        if self._recipe_key is None:
            return blake3.blake3(recipe, derive_key_context=RECIPE_CONTEXT).digest()
        return blake3.blake3(recipe, key=self._recipe_key).digest()

    def blob_id(self, kind: int, plain: bytes | memoryview) -> bytes:
        return self.sealer.chunk_id(plain) if kind == KIND_BLOCK else self.recipe_id(plain)

    def parse_recipe(self, chunk_id: bytes, recipe: bytes) -> tuple[int, list[bytes]]:
        """The chunk's length and block IDs; IntegrityError when the recipe is malformed."""
        what = f"chunk {chunk_id.hex()[:16]}"
        if len(recipe) < _LENGTH.size:
            raise IntegrityError(f"{what} is corrupt: recipe too short")
        (length,) = _LENGTH.unpack_from(recipe)
        count = -(-length // self.block_size)
        if not 0 < length <= self.chunk_size or len(recipe) != _LENGTH.size + ID_SIZE * count:
            raise IntegrityError(f"{what} is corrupt: malformed recipe")
        ids = [recipe[4 + k * ID_SIZE : 4 + (k + 1) * ID_SIZE] for k in range(count)]
        return length, ids

    # -- objects --------------------------------------------------------------

    def encode(
        self, kind: int, blob_id: bytes, plain: bytes | memoryview, level: int, probe: bool = False
    ) -> bytes:
        return bytes(self.encode_parts(kind, blob_id, plain, level, probe))

    def encode_parts(
        self, kind: int, blob_id: bytes, plain: bytes | memoryview, level: int, probe: bool = False
    ) -> Sealed:
        """The stored blob as pieces (a pack takes them without a join). `probe`: the blob's
        chunk looked incompressible, so sample it before compressing."""
        return self.encode_many(kind, ((blob_id, plain),), level, probe)[0][1]

    def encode_many(
        self,
        kind: int,
        blobs: Iterable[tuple[bytes, bytes | memoryview]],
        level: int,
        probe: bool = False,
        deferred: bool = False,
    ) -> list[tuple[bytes, Sealed]]:
        """Each blob encoded as `encode_parts` does, in one loop (a backup encodes a call per
        64 KiB block: the headers are made once, not per block). `deferred`: compressed
        now, sealed where the packer writes it (crypto.DeferredSealed: a direct write's
        buffer)."""
        sealer = self.sealer
        encrypted = sealer.encrypted
        flags = FLAG_ENCRYPTED if encrypted else 0
        heads = (header(MAGICS[kind], flags), header(MAGICS[kind], flags | FLAG_ZSTD))
        out: list[tuple[bytes, Sealed]] = []
        for blob_id, plain in blobs:
            payload, compressed = (
                compress_if_smaller(plain, level, probe) if level > 0 else (plain, False)
            )
            head = heads[compressed]
            if deferred:
                out.append((blob_id, sealer.seal_deferred(head, payload, head + blob_id)))
            elif encrypted:
                out.append((blob_id, sealer.seal_parts(head, payload, head + blob_id)))
            else:
                out.append((blob_id, Sealed((head, bytes(payload)))))
        return out

    def decode(self, kind: int, blob_id: bytes, raw: bytes | memoryview) -> bytes:
        """The blob's plaintext, or IntegrityError: wrong kind, failed authentication, too
        long, or content that does not hash to `blob_id`."""
        return self.decode_many(kind, ((blob_id, raw),))[blob_id]

    def decode_many(
        self, kind: int, blobs: Iterable[tuple[bytes, bytes | memoryview]]
    ) -> dict[bytes, bytes]:
        """Each blob's plaintext by ID, every one checked as `decode` says. One loop with
        its lookups hoisted: a restore decodes one call per 64 KiB block, and the Python
        around each (attribute lookups, messages built in advance, a decompressor made per
        call) was most of what format 3's restore cost over format 1's."""
        magic = MAGICS[kind] + bytes((OBJECT_VERSION,))
        limit = self.max_plain[kind]
        sealer = self.sealer
        encrypted = sealer.encrypted
        allowed = FLAG_ZSTD | FLAG_ENCRYPTED
        want = FLAG_ENCRYPTED if encrypted else 0
        ids = sealer.chunk_id if kind == KIND_BLOCK else self.recipe_id
        out: dict[bytes, bytes] = {}
        for blob_id, raw in blobs:
            head = bytes(raw[:HEADER_SIZE])
            if len(head) < HEADER_SIZE or head[:5] != magic:
                raise _corrupt(kind, blob_id, "bad header")
            flags = head[5]
            if flags & FLAG_ENCRYPTED != want or flags & ~allowed:
                raise _corrupt(kind, blob_id, f"unexpected flags {flags:#x}")
            payload: bytes | memoryview = memoryview(raw)[HEADER_SIZE:]
            if encrypted:
                payload = sealer.open(payload, head + blob_id, _what(kind, blob_id))
            data = (
                decompress(payload, _what(kind, blob_id), limit) if flags & FLAG_ZSTD else payload
            )
            if len(data) > limit:
                raise _corrupt(kind, blob_id, f"longer than {limit} bytes")
            if ids(data) != blob_id:
                raise _corrupt(kind, blob_id, "content does not match its ID")
            out[blob_id] = data if isinstance(data, bytes) else bytes(data)
        return out


@functools.cache
def _zeros(size: int) -> bytes:
    """A zero block to compare against (one per block size; calloc'd, never written)."""
    return bytes(size)


def _what(kind: int, blob_id: bytes) -> str:
    return f"{KIND_NAMES[kind]} {blob_id.hex()[:16]}"


def _corrupt(kind: int, blob_id: bytes, reason: str) -> IntegrityError:
    return IntegrityError(f"{_what(kind, blob_id)} is corrupt: {reason}")
