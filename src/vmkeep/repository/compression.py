"""zstd compression, kept only when it makes the object smaller."""

from __future__ import annotations

import threading

import zstandard

from vmkeep.errors import IntegrityError

MAX_DECOMPRESSED = 64 * 1024 * 1024
SAMPLE_SIZE = 32 * 1024  # no object of format v1 is larger; bounds hostile input

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # Compressor objects are not thread-safe; one per thread and level avoids re-creating them.
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def compress(data: bytes, level: int) -> bytes:
    return bytes(_compressor(level).compress(data))


def looks_incompressible(data: bytes) -> bool:
    """Three 32 KiB samples at level 1: encrypted or already-compressed data (a large part of
    real disks) then skips the full compression, which would cost CPU only to be discarded."""
    if len(data) < 1024 * 1024:
        return False
    step = SAMPLE_SIZE
    mid = len(data) // 2
    sample = data[:step] + data[mid : mid + step] + data[-step:]
    return len(_compressor(1).compress(sample)) > len(sample) * 0.97


def compress_if_smaller(data: bytes, level: int) -> tuple[bytes, bool]:
    if looks_incompressible(data):
        return data, False
    packed = compress(data, level)
    if len(packed) < len(data):
        return packed, True
    return data, False


def decompress(packed: bytes | memoryview, what: str, limit: int = MAX_DECOMPRESSED) -> bytes:
    """At most `limit` bytes of output. zstandard honours max_output_size only for frames
    without a recorded content size: a frame that claims more is refused before decoding,
    or a few hostile bytes would make it allocate whatever they claim."""
    try:
        claimed = zstandard.frame_content_size(packed)
        if claimed > limit:
            raise IntegrityError(
                f"{what} is corrupt: it would decompress to {claimed} bytes, more than {limit}"
            )
        return zstandard.ZstdDecompressor().decompress(packed, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what} is corrupt: cannot decompress ({exc})") from exc
