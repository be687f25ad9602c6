"""Reading and checking a repository's config, apart from the rest of repository.py: it is
what must run before the key derivation can start (repository/opening.py), so it imports
only what it needs; the data path's modules are imported meanwhile (docs/RUN-OVERHEAD.md)."""

from __future__ import annotations

import json
from typing import Any

from vmkeep.errors import NotFoundError, RepositoryError
from vmkeep.remotes.base import Remote

from .config_auth import KnownRepository, check_known, check_plain_config
from .format import (
    CONFIG_NAME,
    CONFIG_VERSION_FIXED,
    CONFIG_VERSION_PACKED,
    CONFIG_VERSION_SIZED,
    CONFIG_VERSIONS,
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    valid_chunk_size,
)
from .limits import MAX_CONFIG_BYTES, get_bounded
from .packs import valid_pack_size

ENCRYPTIONS = ("aes-256-gcm", "none")
MAX_KEYS = 64  # each entry costs an Argon2id run (64 MiB, ~0.2 s) when the passphrase is wrong
CHUNK_SIZE_RULE = f"a power of two from {MIN_CHUNK_SIZE >> 10} KiB to {MAX_CHUNK_SIZE >> 20} MiB"
BLOCK_SIZE_RULE = f"a power of two from {MIN_CHUNK_SIZE >> 10} KiB to the chunk size"
PACK_SIZE_RULE = "a power of two from 1 MiB to 128 MiB"


def read_config(remote: Remote, known: KnownRepository | None = None) -> dict[str, Any]:
    """The first half of Repository.open: the config, parsed and checked against `known`; a
    plain one is checked whole (an encrypted one's MAC needs the key: Repository.with_key)."""
    try:
        what = f"{remote.url}: repository config"
        raw = get_bounded(remote, CONFIG_NAME, MAX_CONFIG_BYTES, RepositoryError, what)
    except NotFoundError as exc:
        raise RepositoryError(f"no vmkeep repository at {remote.url} (run `vmkeep init`)") from exc
    config = parse_config(raw, remote.url)
    if known is not None:
        check_known(known, config, remote.url)
    if config["encryption"] == "none":
        check_plain_config(config, remote.url)
    return config


def parse_config(raw: bytes, where: str) -> dict[str, Any]:
    try:
        config = json.loads(raw)
        if not isinstance(config, dict) or config.get("format") != "vmkeep-repository":
            raise ValueError("not a vmkeep repository config")
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]
        raise RepositoryError(f"{where}: repository config is unreadable ({reason})") from None
    version = config.get("version")
    if type(version) is not int or version not in CONFIG_VERSIONS:
        raise RepositoryError(
            f"{where}: repository format version {_shown(version)} is not supported "
            f"(this vmkeep reads versions {CONFIG_VERSION_FIXED}, {CONFIG_VERSION_SIZED} and "
            f"{CONFIG_VERSION_PACKED})"
        )
    chunk_size = config.get("chunk_size")
    if version == CONFIG_VERSION_FIXED and chunk_size != DEFAULT_CHUNK_SIZE:
        raise RepositoryError(
            f"{where}: repository config version 1 has chunk_size {_shown(chunk_size)}, "
            f"version 1 allows only {DEFAULT_CHUNK_SIZE}"
        )
    if not valid_chunk_size(chunk_size):
        raise RepositoryError(
            f"{where}: repository config has chunk_size {_shown(chunk_size)}, not {CHUNK_SIZE_RULE}"
        )
    if version == CONFIG_VERSION_PACKED:
        block, pack = config.get("block_size"), config.get("pack_size")
        if not valid_chunk_size(block) or block > chunk_size:  # type: ignore[operator]
            raise RepositoryError(
                f"{where}: repository config has block_size {_shown(block)}, not {BLOCK_SIZE_RULE}"
            )
        if not valid_pack_size(pack):
            raise RepositoryError(
                f"{where}: repository config has pack_size {_shown(pack)}, not {PACK_SIZE_RULE}"
            )
    encryption = config.get("encryption")
    if encryption not in ENCRYPTIONS:
        raise RepositoryError(f"{where}: repository config has unsupported parameters")
    if encryption != "none" and config.get("chunk_id") != "blake3-keyed":
        raise RepositoryError(f"{where}: repository config has unsupported parameters")
    keys, repo_id = config.get("keys"), config.get("id")
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise RepositoryError(f"{where}: repository config is malformed (keys)")
    if len(keys) > MAX_KEYS:
        raise RepositoryError(f"{where}: repository config has more than {MAX_KEYS} keys")
    if not isinstance(repo_id, str) or not 1 <= len(repo_id) <= 64:
        raise RepositoryError(f"{where}: repository config is malformed (id)")
    return config


def _shown(value: object) -> str:
    """A config value quoted for a one-line message, however long a hostile one is."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
