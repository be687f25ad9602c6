"""Opening, creating and using a repository on a remote."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vmkeep.errors import (
    IntegrityError,
    NotFoundError,
    ObjectExistsError,
    RemoteError,
    RepositoryError,
    UsageError,
    WrongPassphraseError,
)
from vmkeep.parallel import io_threads, ordered_map
from vmkeep.remotes.base import Remote, put_parts
from vmkeep.remotes.local import LocalRemote

from .chunk_fetch import (
    FetchedChunks,
    decode_objects,
    decode_packed,
    decode_packed_parts,
    fetch_objects,
    fetch_packed,
    group_size,
)
from .chunks import encode_chunk
from .config_auth import (
    MAC_KEY,
    KnownRepository,
    check_config_mac,
    config_mac,
)
from .config_read import BLOCK_SIZE_RULE, ENCRYPTIONS, PACK_SIZE_RULE, read_config
from .config_read import CHUNK_SIZE_RULE as CHUNK_SIZE_RULE  # re-exported: repo_commands
from .crypto import RepositoryKey, Sealed, Sealer, unwrap_key, wrap_key
from .format import (
    CHUNKS_PREFIX,
    CONFIG_NAME,
    CONFIG_VERSION_FIXED,
    CONFIG_VERSION_PACKED,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CHUNK_SIZE,
    ID_SIZE,
    MANIFESTS_PREFIX,
    chunk_object_name,
    config_version,
    manifest_object_name,
    valid_chunk_size,
)
from .gc_epoch import missing_chunks
from .limits import MAX_MANIFEST_OBJECT, get_bounded
from .manifest import Manifest, check_chunk_size, decode_manifest, encode_manifest
from .manifest_v2 import load_object, save_object
from .packed_store import PackedChunk, PackedStore
from .packs import DEFAULT_PACK_SIZE, valid_pack_size
from .read_buffers import ReadBuffers

FORMATS = (1, 2, CONFIG_VERSION_PACKED)
PassphraseSource = Callable[[], bytes]


@dataclass
class ManifestProblem:
    point_id: str
    error: str


class Repository:
    def __init__(self, remote: Remote, config: dict[str, Any], key: RepositoryKey | None) -> None:
        self.remote = remote
        self.config = config
        self.sealer = Sealer(key)
        self.key = key
        packed = config.get("version") == CONFIG_VERSION_PACKED
        self.packed = PackedStore(remote, self.sealer, config) if packed else None

    # -- creation and opening -------------------------------------------------

    @classmethod
    def init(
        cls,
        remote: Remote,
        encryption: str,
        passphrase: PassphraseSource,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        format_version: int | None = None,
        block_size: int | None = None,
        pack_size: int = DEFAULT_PACK_SIZE,
    ) -> Repository:
        """Without `format_version`: format 3 (blocks in packs) at the default 4 MiB chunk
        size, format 2 at any other (as before format 3 was the default): default_format."""
        if encryption not in ENCRYPTIONS:
            raise UsageError(
                f"unknown encryption {encryption!r}: choose {' or '.join(ENCRYPTIONS)}"
            )
        if not valid_chunk_size(chunk_size):
            raise UsageError(f"chunk size {chunk_size} is not {CHUNK_SIZE_RULE}")
        version = _format_version(format_version, chunk_size)
        packed = version == CONFIG_VERSION_PACKED
        block_size = min(DEFAULT_BLOCK_SIZE, chunk_size) if block_size is None else block_size
        if packed:
            _check_packed(chunk_size, block_size, pack_size)
        _refuse_foreign_directory(remote)
        repo_id = uuid.uuid4().hex
        key = RepositoryKey.generate() if encryption != "none" else None
        config: dict[str, Any] = {
            "format": "vmkeep-repository",
            "version": version,
            "id": repo_id,
            "created": datetime.now(UTC).isoformat(),
            "chunk_size": chunk_size,
            **({"block_size": block_size, "pack_size": pack_size} if packed else {}),
            "chunk_id": "blake3-keyed" if key else "blake3",
            "encryption": encryption,
            "keys": [wrap_key(key, passphrase(), repo_id, "initial")] if key else [],
        }
        if key:
            config[MAC_KEY] = config_mac(key, config)
        try:
            remote.put(CONFIG_NAME, json.dumps(config, indent=1).encode(), overwrite=False)
            remote.flush()
        except ObjectExistsError as exc:
            raise RepositoryError(f"a repository already exists at {remote.url}") from exc
        return cls(remote, config, key)

    @classmethod
    def open(
        cls, remote: Remote, passphrase: PassphraseSource, known: KnownRepository | None = None
    ) -> Repository:
        """`passphrase` is only called for an encrypted repository. `known`: what the client
        recorded about this repository (a named remote); a config that disagrees is refused
        before the passphrase is asked. An encrypted config's MAC is checked, or added once
        when it has none (a repository made before format revision 3)."""
        config = read_config(remote, known)
        if config["encryption"] == "none":
            return cls(remote, config, None)
        key, _ = unwrap_key(config["keys"], passphrase(), config["id"])
        return cls.with_key(remote, config, key)

    @classmethod
    def with_key(cls, remote: Remote, config: dict[str, Any], key: RepositoryKey) -> Repository:
        """The second half of `open` for an encrypted config: its MAC checked (or added)."""
        repo = cls(remote, config, key)
        if not check_config_mac(key, config, remote.url):
            repo._add_config_mac()
        return repo

    def _add_config_mac(self) -> None:
        """The one-time upgrade of an encrypted config made before the MAC existed. Only when
        the newest restore point agrees with the config (an altered config must not get
        authenticated); best effort: a read-only or immutable remote keeps it as it is."""
        assert self.key is not None
        ids = self.point_ids()
        if ids:
            try:
                self.load_manifest(ids[-1])  # RepositoryError when the config disagrees
            except (IntegrityError, NotFoundError):
                return  # a corrupt (or just deleted) point proves nothing: not now
        self.config[MAC_KEY] = config_mac(self.key, self.config)
        try:
            self._save_config()
        except RemoteError:
            del self.config[MAC_KEY]

    @property
    def known(self) -> KnownRepository:
        """What a client records about this repository to check it at later opens."""
        return KnownRepository.of(self.config)

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    @property
    def chunk_size(self) -> int:
        """Bytes per chunk, fixed at init (parse_config checked it)."""
        return int(self.config["chunk_size"])

    # -- keys -----------------------------------------------------------------

    def add_key(self, passphrase: bytes, label: str) -> str:
        if self.key is None:
            raise UsageError("this repository is not encrypted: it has no keys")
        entry = wrap_key(self.key, passphrase, self.config["id"], label)
        self.config["keys"].append(entry)
        self._save_config()
        return str(entry["id"])

    def remove_key(self, key_id: str, current_passphrase: bytes) -> None:
        keys = self.config["keys"]
        if key_id not in {k.get("id") for k in keys}:
            raise NotFoundError(f"no key {key_id} in this repository")
        remaining = [k for k in keys if k.get("id") != key_id]
        try:  # never remove the last key that the caller can still open
            unwrap_key(remaining, current_passphrase, self.config["id"])
        except WrongPassphraseError as exc:
            raise UsageError("refusing to remove the key you opened the repository with") from exc
        self.config["keys"] = remaining
        self._save_config()

    def _save_config(self) -> None:
        self.remote.put(CONFIG_NAME, json.dumps(self.config, indent=1).encode())
        self.remote.flush()

    # -- chunks ---------------------------------------------------------------

    def chunk_id(self, data: bytes) -> bytes:
        if self.packed is not None:
            return self.packed.chunk_id(data)
        return self.sealer.chunk_id(data)

    def put_chunk(self, chunk_id: bytes, data: bytes, level: int) -> int:
        blob = self.encode_chunk(chunk_id, data, level)
        self.store_chunk(chunk_id, blob)
        return len(blob)

    def get_chunk(self, chunk_id: bytes) -> bytes:
        if self.packed is not None:
            return self.packed.get_chunk(chunk_id)
        return self.decode_chunks(self.fetch_chunks([chunk_id]))[0]

    # The two halves of get_chunk, for the restore pipeline that keeps more fetches (I/O
    # threads) in flight than decodes (one thread per core); repository/chunk_fetch.py.

    @property
    def fetch_group(self) -> int:
        """How many consecutive chunks one `fetch_chunks` call should take."""
        return group_size(self.packed, self.chunk_size)

    def fetch_chunks(
        self, chunk_ids: list[bytes], buffers: ReadBuffers | None = None
    ) -> FetchedChunks:
        """The raw bytes of these chunks (I/O only; nothing in them is trusted yet).
        `buffers`: where a local remote's packs may be read directly (FetchedChunks.release
        gives them back)."""
        if self.packed is not None:
            return fetch_packed(self.packed, chunk_ids, buffers)
        return fetch_objects(self.remote, chunk_ids, self.chunk_size)

    def decode_chunks(self, fetched: FetchedChunks) -> list[bytes]:
        """The plaintext of each fetched chunk, in order (CPU only), or IntegrityError."""
        if self.packed is not None:
            return decode_packed(self.packed, fetched)
        return decode_objects(self.sealer, fetched, self.chunk_size)

    def decode_chunk_parts(self, fetched: FetchedChunks) -> list[list[bytes]]:
        """As decode_chunks, each chunk as consecutive parts whose concatenation is its
        plaintext (format 3: its blocks; versions 1 and 2: the chunk whole)."""
        if self.packed is not None:
            return decode_packed_parts(self.packed, fetched)
        return [[data] for data in decode_objects(self.sealer, fetched, self.chunk_size)]

    # The two halves of put_chunk, for the backup pipeline that runs the CPU half (zstd,
    # AES-GCM) under a CPU gate and the I/O half (the remote's put) outside it.

    def encode_chunk(self, chunk_id: bytes, data: bytes, level: int) -> Sealed | PackedChunk:
        """The chunk object for `data` (CPU only); format 3: its recipe and new blocks."""
        if self.packed is not None:
            return self.packed.encode(chunk_id, data, level)
        return encode_chunk(self.sealer, chunk_id, data, level)

    def store_chunk(self, chunk_id: bytes, blob: Sealed | PackedChunk) -> None:
        """Put an encoded chunk object (I/O only); format 3: append it to the packer."""
        if isinstance(blob, PackedChunk):
            assert self.packed is not None
            self.packed.store(chunk_id, blob)
        else:
            put_parts(self.remote, chunk_object_name(chunk_id), blob.take())

    def flush_chunks(self) -> None:
        """Format 3: the packs and the index of what was stored, durable (a backup's last
        write before its checks and manifest). Versions 1 and 2: nothing to do."""
        if self.packed is not None:
            self.packed.flush()

    def writing(self) -> AbstractContextManager[None]:
        """Around one backup or mirror that stores chunks (format 3: PackedStore.writing)."""
        return self.packed.writing() if self.packed is not None else nullcontext()

    def refresh_index(self) -> None:
        """Format 3: right after a backup or mirror reads the gc marker, forget an index this
        process read before it (FORMAT.md §13.7). Versions 1 and 2 stat each chunk."""
        if self.packed is not None:
            self.packed.refresh()

    def has_chunk(self, chunk_id: bytes) -> bool:
        """One lookup: a stat of the chunk object, or (format 3) the index."""
        if self.packed is not None:
            return self.packed.has_chunk(chunk_id)
        return self.remote.stat(chunk_object_name(chunk_id)) is not None

    def missing_chunks(self, chunk_ids: Iterable[bytes]) -> list[bytes]:
        """The chunks of `chunk_ids` no longer stored (after a gc overlapped a backup)."""
        if self.packed is not None:
            return self.packed.missing_chunks(chunk_ids)
        return missing_chunks(self.remote, chunk_ids)

    def list_chunks(self) -> Iterator[tuple[bytes, int]]:
        """(chunk id, stored size) of every chunk object (format 3: every indexed recipe)."""
        if self.packed is not None:
            yield from self.packed.list_chunks()
            return
        for obj in self.remote.list(CHUNKS_PREFIX):
            hexid = obj.name.rsplit("/", 1)[-1]
            try:
                chunk_id = bytes.fromhex(hexid)
            except ValueError:
                continue
            if len(chunk_id) == ID_SIZE:
                yield chunk_id, obj.size

    def delete_chunk(self, chunk_id: bytes) -> None:
        if self.packed is not None:
            raise RepositoryError("format 3 repositories free space by gc's pack sweep only")
        self.remote.delete(chunk_object_name(chunk_id))

    # -- manifests ------------------------------------------------------------

    def point_ids(self) -> list[str]:
        return sorted(self.point_sizes())

    def point_sizes(self) -> dict[str, int]:
        """Every listed restore point and the size its manifest object was listed with."""
        return {o.name[len(MANIFESTS_PREFIX) :]: o.size for o in self.remote.list(MANIFESTS_PREFIX)}

    def save_manifest(self, manifest: Manifest) -> None:
        """The last write of a backup: from here on the restore point exists."""
        check_chunk_size(manifest, self.chunk_size, f"refusing to save restore point {manifest.id}")
        if self.packed is not None and manifest.has_table():  # FORMAT.md §5.5
            self.flush_chunks()
            self.remote.flush()
            save_object(self.remote, self.sealer, manifest)
            self.remote.flush()
            return
        blob = encode_manifest(self.sealer, manifest)
        self.flush_chunks()  # format 3: packs, then the index
        self.remote.flush()  # every chunk durable before the manifest that references it
        self.remote.put(manifest_object_name(manifest.id), blob, overwrite=False)
        self.remote.flush()

    def load_manifest(self, point_id: str, listed_size: int | None = None) -> Manifest:
        """`listed_size`: the size a listing gave (commands that read many manifests): it
        stands for the stat that otherwise refuses an oversized object before reading it.
        Either way the read itself is bounded (a ranged get), whatever the remote claims."""
        what = f"manifest {point_id}"
        if self.packed is not None:  # object versions 1 and 2 (FORMAT.md §5.5)
            try:
                return load_object(self.remote, self.sealer, point_id, listed_size, self.chunk_size)
            except NotFoundError as exc:
                raise NotFoundError(f"no restore point {point_id}") from exc
        if listed_size is not None and listed_size > MAX_MANIFEST_OBJECT:
            raise IntegrityError(f"{what} is larger than the format allows: refusing to read it")
        try:  # the object is passed on, not kept: decode_manifest frees it once opened
            return decode_manifest(
                self.sealer,
                point_id,
                get_bounded(
                    self.remote,
                    manifest_object_name(point_id),
                    MAX_MANIFEST_OBJECT,
                    IntegrityError,
                    what,
                    stat_first=listed_size is None,
                ),
                self.chunk_size,
            )
        except NotFoundError as exc:
            raise NotFoundError(f"no restore point {point_id}") from exc

    def load_manifests(self) -> tuple[list[Manifest], list[ManifestProblem]]:
        """Every restore point that verifies, and the ones that do not (corrupt, unreadable).
        Fetched in parallel: on an object store each is a round trip, and every backup and
        listing reads them all."""

        def load(point_id: str) -> Manifest | ManifestProblem:
            try:
                return self.load_manifest(point_id)
            except (IntegrityError, NotFoundError) as exc:
                return ManifestProblem(point_id, str(exc))

        loaded = list(ordered_map(load, self.point_ids(), io_threads(self.remote.url)))
        good = [m for m in loaded if isinstance(m, Manifest)]
        bad = [m for m in loaded if isinstance(m, ManifestProblem)]
        return good, bad

    def delete_manifest(self, point_id: str) -> None:
        self.remote.delete(manifest_object_name(point_id))

    def resolve_point(self, ref: str) -> str:
        """A restore point by its full id or a unique prefix. An empty one is refused: it is
        a prefix of every id (a script's unset variable would pick the only point)."""
        if not ref.strip():
            raise UsageError("no restore point given: the restore point id is empty")
        return unique_prefix(ref, self.point_ids(), "restore point", self.remote.url)


def unique_prefix(ref: str, ids: list[str], what: str, where: str) -> str:
    """`ref` when it is one of `ids`, else the one id it is a prefix of; NotFoundError when
    none is, UsageError when several are (restore points, metadata points)."""
    if ref in ids:
        return ref
    matches = [i for i in ids if i.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFoundError(f"no {what} {ref!r} in {where}")
    raise UsageError(f"{what} {ref!r} is ambiguous: {len(matches)} match")


def default_format(chunk_size: int) -> int:
    """The format of a new repository when none is asked for: 3 at the default chunk size
    (retention locks included: docs/IMMUTABILITY.md "Format 3"); an explicit other chunk size
    keeps format 2."""
    if chunk_size != DEFAULT_CHUNK_SIZE:
        return config_version(chunk_size)
    return CONFIG_VERSION_PACKED


def _format_version(asked: int | None, chunk_size: int) -> int:
    if asked is None:
        return default_format(chunk_size)
    if asked not in FORMATS:
        raise UsageError(f"unknown repository format {asked}: choose 1, 2 or 3")
    if asked == CONFIG_VERSION_FIXED and chunk_size != DEFAULT_CHUNK_SIZE:
        raise UsageError("format 1 has 4 MiB chunks only: use --format 2 or 3 for other sizes")
    return asked


def _check_packed(chunk_size: int, block_size: int, pack_size: int) -> None:
    if not valid_chunk_size(block_size) or block_size > chunk_size:
        raise UsageError(f"block size {block_size} is not {BLOCK_SIZE_RULE}")
    if not valid_pack_size(pack_size):
        raise UsageError(f"pack size {pack_size} is not {PACK_SIZE_RULE}")


def _refuse_foreign_directory(remote: Remote) -> None:
    """A repository is created only in an empty (or absent) directory: gc and the temp-file
    purge must never act among a user's own files. An existing repository is left to the
    create-if-absent write of its config, which reports it."""
    if not isinstance(remote, LocalRemote) or remote.stat(CONFIG_NAME) is not None:
        return
    entry = remote.foreign_entry()
    if entry is not None:
        raise RepositoryError(
            f"{remote.url} is not empty (it holds {entry!r}) and is not a vmkeep repository: "
            "choose an empty or new directory"
        )
