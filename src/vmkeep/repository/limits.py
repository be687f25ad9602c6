"""Size bounds of repository objects (docs/FORMAT.md §1.1). Every object read from a remote is
read through `get_bounded`, so a huge or endless object (a sparse file, a hostile upload) costs
at most its bound in memory and is refused with one line, never read whole."""

from __future__ import annotations

from vmkeep.errors import VmkeepError
from vmkeep.remotes.base import Remote

from .format import HEADER_SIZE, ID_SIZE, NONCE_SIZE, TAG_SIZE

MAX_CONFIG_BYTES = 1 << 20  # a config with a few thousand wrapped keys still fits
MAX_LOCK_BYTES = 64 << 10  # a lock is a line of JSON
# The manifest document (JSON, before zstd). Its size follows from its disks: about 43 bytes
# per non-zero chunk (base64 of the ID) plus the VM record; 256 MiB holds some 6 million
# chunk IDs (24 TiB of data at 4 MiB chunks, 384 GiB at 64 KiB).
MAX_MANIFEST_DOC = 256 << 20
# The stored manifest object: header + zstd of the document (zstd's worst case adds under
# 1/128) + the AEAD nonce and tag, or the 32-byte checksum.
MAX_MANIFEST_OBJECT = HEADER_SIZE + MAX_MANIFEST_DOC + (MAX_MANIFEST_DOC >> 7) + 4096
MANIFEST_BYTES_PER_ID = 4 * ID_SIZE // 3 + 2  # base64 of one ID, rounded up


def max_chunk_object(chunk_size: int) -> int:
    """A chunk object is never larger than its header, a stored (uncompressed) plaintext of
    one chunk and the AEAD nonce and tag: compressed forms are kept only when smaller."""
    return HEADER_SIZE + NONCE_SIZE + chunk_size + TAG_SIZE


def get_bounded(
    remote: Remote,
    name: str,
    limit: int,
    error: type[VmkeepError],
    what: str,
    stat_first: bool = False,
) -> bytes:
    """The whole object `name`, or `error` when it is longer than `limit` bytes. One ranged
    read of limit + 1 bytes, so nothing beyond the bound is fetched even if the object grows
    meanwhile. `stat_first` (for large bounds, e.g. manifests) refuses an object whose size
    is already over the bound without reading any of it. NotFoundError passes through."""
    if stat_first:
        st = remote.stat(name)
        if st is not None and st.size > limit:
            raise _too_large(error, what, limit)
    data = remote.get(name, 0, limit + 1)
    if len(data) > limit:
        raise _too_large(error, what, limit)
    return data


def _too_large(error: type[VmkeepError], what: str, limit: int) -> VmkeepError:
    return error(
        f"{what} is larger than the {limit} bytes the format allows: "
        "corrupt or not written by vmkeep; refusing to read it"
    )
