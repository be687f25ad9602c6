"""Constants of the repository format (docs/FORMAT.md). Three version numbers live here, and
they move independently: the repository's (`config.version`), the object headers' and the
manifest document's. Changing a layout bumps the version of what it changes, nothing else."""

from __future__ import annotations

# config.version: 1 = 4 MiB chunks only (what every vmkeep reads); 2 = the same format with
# any power-of-two chunk size from 64 KiB to 4 MiB. Such a repository with 4 MiB chunks is
# written as version 1, byte for byte as before, so older readers keep reading it.
CONFIG_VERSION_FIXED = 1
CONFIG_VERSION_SIZED = 2
# 3 = blocks, recipes and packs (FORMAT.md §13): the default of `init` at 4 MiB chunks
# (Repository.init, default_format); 1 or 2 when asked or at other chunk sizes.
CONFIG_VERSION_PACKED = 3
CONFIG_VERSIONS = (CONFIG_VERSION_FIXED, CONFIG_VERSION_SIZED, CONFIG_VERSION_PACKED)
DEFAULT_BLOCK_SIZE = 64 * 1024  # the dirty-bitmap granularity; the index is on disk (blob_index.py)

# The version byte in chunk and manifest object headers (§4.2, §5.2). Their layout did not
# change with config version 2, so it stays 1 whatever the chunk size.
OBJECT_VERSION = 1
# The manifest document's "version" key (§5.3). 2: disk indexes are sparse runs (`runs`);
# version 1 documents (every entry in `chunks`) are still read.
MANIFEST_DOC_VERSION = 2
MANIFEST_DOC_VERSIONS = (1, 2)

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024  # the only size of config version 1
MIN_CHUNK_SIZE = 64 * 1024  # QEMU's dirty-bitmap granularity: a finer chunk reads no less
MAX_CHUNK_SIZE = DEFAULT_CHUNK_SIZE
CHUNK_SIZES = tuple(1 << n for n in range(16, 23))  # 64 KiB .. 4 MiB

ID_SIZE = 32
ZERO_ID = bytes(ID_SIZE)  # index entry of an all-zero chunk, which is never stored

# One zero buffer per allowed chunk size, made once (calloc'd: no memory is touched until a
# comparison reads it, and then only the kernel's zero page), so that is_zero is one memcmp.
_ZERO_CHUNKS = {size: bytes(size) for size in CHUNK_SIZES}


def is_zero(data: bytes) -> bool:
    """One memcmp against a shared zero buffer. Only a length that is not a chunk size (a
    disk's short last chunk, a replication piece cut at an extent) allocates one."""
    zeros = _ZERO_CHUNKS.get(len(data))
    return data == (zeros if zeros is not None else bytes(len(data)))


def valid_chunk_size(value: object) -> bool:
    """A power of two from MIN_CHUNK_SIZE to MAX_CHUNK_SIZE (never a bool, float or string)."""
    return type(value) is int and value in CHUNK_SIZES


def config_version(chunk_size: int) -> int:
    """The config version a new repository with this chunk size is written as."""
    return CONFIG_VERSION_FIXED if chunk_size == DEFAULT_CHUNK_SIZE else CONFIG_VERSION_SIZED


def chunk_count(size: int, chunk_size: int) -> int:
    """Entries of a disk's index: the last chunk may be short."""
    return -(-size // chunk_size)


def chunk_length(index: int, size: int, chunk_size: int) -> int:
    """Bytes of chunk `index` of a disk of `size` bytes."""
    return min(chunk_size, size - index * chunk_size)


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
    return magic + bytes((OBJECT_VERSION, flags, 0, 0))
