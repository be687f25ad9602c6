"""zstd compression, kept only when it makes the object smaller."""

from __future__ import annotations

import threading

import zstandard

from vmkeep.errors import IntegrityError

MAX_DECOMPRESSED = 64 * 1024 * 1024
SAMPLE_SIZE = 32 * 1024  # no object of format v1 is larger; bounds hostile input
SAMPLED_ABOVE = 1024 * 1024  # shorter data is always compressed (v1, v2)
# Format 3 (PackedStore.encode): a chunk is first judged by 8 KiB samples; only in a chunk
# that looks incompressible is each block judged, by 4 KiB samples, before it is compressed.
# zstd's own bail-out on random data costs ~0.8 ms per 4 MiB; the probes ~0.1 ms
# (docs/DATA-PATH.md, "CPU of a full backup").
CHUNK_PROBE = 8 * 1024
BLOCK_PROBE = 4 * 1024

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # Compressor objects are not thread-safe; one per thread and level avoids re-creating them.
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    # Creating one cost ~2 us and a fresh context's tables per call, once per 64 KiB block
    # of a format 3 restore (perf: Decompressor_init); each call resets it (session only).
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if dctx is None:
        dctx = _local.decompressor = zstandard.ZstdDecompressor()
    return dctx


def compress(data: bytes | memoryview, level: int) -> bytes:
    return bytes(_compressor(level).compress(data))


def looks_incompressible(
    data: bytes | memoryview, sample: int = SAMPLE_SIZE, above: int = SAMPLED_ABOVE
) -> bool:
    """Three samples (start, middle, end) at level 1: encrypted or already-compressed data (a
    large part of real disks) then skips the full compression, which would cost CPU only to
    be discarded. Data shorter than `above` is never judged by samples."""
    if len(data) < max(above, 3 * sample):
        return False
    mid = len(data) // 2
    joined = b"".join((data[:sample], data[mid : mid + sample], data[-sample:]))
    return len(_compressor(1).compress(joined)) > len(joined) * 0.97


def compress_if_smaller(
    data: bytes | memoryview, level: int, probe: bool = False
) -> tuple[bytes | memoryview, bool]:
    """`probe`: judge `data` by BLOCK_PROBE samples whatever its length (a format 3 block of a
    chunk that looked incompressible); else only data of SAMPLED_ABOVE or more is sampled."""
    if probe:
        incompressible = looks_incompressible(data, BLOCK_PROBE, 0)
    else:
        incompressible = looks_incompressible(data)
    if incompressible:
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
        return _decompressor().decompress(packed, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what} is corrupt: cannot decompress ({exc})") from exc
