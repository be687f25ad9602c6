"""Authenticating the repository `config` (docs/FORMAT.md §2, §9).

Whoever can write the remote can rewrite `config`. In an encrypted repository a MAC keyed from
the repository key covers every key of the document but the MAC itself and `keys` (each wrapped
key is authenticated by unwrapping it: its AAD binds it to `id`), so a changed `encryption`,
`chunk_size`, `chunk_id`, `version` or `id` is refused. An unencrypted repository has no key
to make a MAC with; there the client's memory of the repository (its named remote) and the
existing manifests are what catches a downgrade."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

import blake3

from vmkeep.errors import IntegrityError, RepositoryError

from .crypto import RepositoryKey

MAC_KEY = "mac"
UNCOVERED = (MAC_KEY, "keys")  # `keys`: each entry is authenticated by unwrapping it
_MAC_CONTEXT = "vmkeep 2026-12 repository config MAC v1"


def canonical_config(config: dict[str, Any]) -> bytes:
    """The bytes the MAC covers: the covered keys as sorted, compact, ASCII-only JSON, so the
    MAC does not depend on how a writer indented or ordered the object."""
    covered = {k: v for k, v in config.items() if k not in UNCOVERED}
    return json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def config_mac(key: RepositoryKey, config: dict[str, Any]) -> str:
    """Keyed BLAKE3 of the canonical config, with a key derived from the repository key (its
    own context string: the MAC key is never the data key nor the ID key)."""
    mac_key = blake3.blake3(key.to_bytes(), derive_key_context=_MAC_CONTEXT).digest()
    return blake3.blake3(canonical_config(config), key=mac_key).hexdigest()


def check_config_mac(key: RepositoryKey, config: dict[str, Any], where: str) -> bool:
    """True when the config carries a MAC and it verifies; False when it has none (a
    repository made before format revision 3); IntegrityError when it does not verify."""
    mac = config.get(MAC_KEY)
    if mac is None:
        return False
    if not isinstance(mac, str) or not hmac.compare_digest(mac, config_mac(key, config)):
        raise IntegrityError(
            f"{where}: repository config fails authentication: someone who can write the "
            "remote changed it (encryption, chunk size, id or version); refusing to use it"
        )
    return True


def check_plain_config(config: dict[str, Any], where: str) -> None:
    """An unencrypted config must not carry what only an encrypted one has: keys, a MAC, keyed
    chunk IDs. Those left behind mean `encryption` was edited to "none"."""
    if config["keys"] or MAC_KEY in config or config.get("chunk_id") != "blake3":
        raise RepositoryError(
            f"{where}: repository config says unencrypted but carries the keys or the "
            "authentication of an encrypted repository: it was altered; refusing to use it"
        )


@dataclass(frozen=True)
class KnownRepository:
    """What a client recorded about a repository when it first used it (a named remote)."""

    id: str
    encrypted: bool
    chunk_size: int
    authenticated: bool  # its config carried a verified MAC

    @classmethod
    def of(cls, config: dict[str, Any]) -> KnownRepository:
        return cls(
            str(config["id"]),
            config["encryption"] != "none",
            int(config["chunk_size"]),
            MAC_KEY in config,
        )


def check_known(known: KnownRepository, config: dict[str, Any], where: str) -> None:
    """Refuse a config that disagrees with what this client recorded, before any passphrase is
    asked and anything is read or written: a downgrade to plaintext, another chunk size, a
    replaced repository, or a stripped MAC."""
    now = KnownRepository.of(config)
    fix = "; if that is intended, `vmkeep remote remove` and `vmkeep remote add` it again"
    if now.id != known.id:
        raise RepositoryError(
            f"{where}: repository id is {now.id[:32]!r}, this remote was added with "
            f"{known.id!r}: it was replaced{fix}"
        )
    if known.encrypted and not now.encrypted:
        raise RepositoryError(
            f"{where}: repository config now says unencrypted, but it was encrypted when this "
            "remote was added: refusing to write plaintext (the config was altered)"
        )
    if now.encrypted != known.encrypted or now.chunk_size != known.chunk_size:
        raise RepositoryError(
            f"{where}: repository config changed (chunk size {now.chunk_size}, was "
            f"{known.chunk_size}; encrypted {now.encrypted}, was {known.encrypted}){fix}"
        )
    if known.authenticated and not now.authenticated:
        raise IntegrityError(
            f"{where}: repository config lost its authentication code (it had one when this "
            "client last used it): it was altered; refusing to use it"
        )
