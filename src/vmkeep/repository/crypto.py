"""Keys and authenticated encryption: a random repository key wrapped by passphrases."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Any

import blake3
from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmkeep.errors import IntegrityError, RepositoryError, WrongPassphraseError

from .format import NONCE_SIZE

TAG_SIZE = 16  # AES-GCM's tag, after the ciphertext

KEY_AAD_PREFIX = b"vmkeep-key-v1:"
# Argon2id: 64 MiB, 3 passes, 2 lanes (about 0.2 s here).
DEFAULT_TIME_COST = 3
DEFAULT_MEMORY_KIB = 65536
DEFAULT_PARALLELISM = 2


@dataclass(frozen=True)
class RepositoryKey:
    """The secret of an encrypted repository: one key encrypts, the other keys chunk IDs."""

    data_key: bytes  # AES-256-GCM key for chunks and manifests
    id_key: bytes  # BLAKE3 key for chunk IDs, so IDs reveal nothing about plaintext

    @classmethod
    def generate(cls) -> RepositoryKey:
        return cls(os.urandom(32), os.urandom(32))

    def to_bytes(self) -> bytes:
        return self.data_key + self.id_key

    @classmethod
    def from_bytes(cls, raw: bytes) -> RepositoryKey:
        if len(raw) != 64:
            raise RepositoryError("repository key has the wrong length")
        return cls(raw[:32], raw[32:])


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


# Sizes of a key entry's fields (docs/FORMAT.md §3); anything else is refused before Argon2
# or AES-GCM see it (a short salt or nonce made them raise, an internal error).
SALT_SIZE = 16
WRAPPED_SIZE = 64 + 16  # the repository key and the GCM tag


def _unb64(text: Any, size: int, field: str) -> bytes:
    """A base64 field of a key entry, exactly `size` bytes long."""
    if not isinstance(text, str) or len(text) > 4 * size:
        raise RepositoryError(f"repository config: malformed key entry ({field})")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise RepositoryError(f"repository config: malformed key entry ({field})") from exc
    if len(raw) != size:
        raise RepositoryError(
            f"repository config: malformed key entry ({field} is {len(raw)} bytes, not {size})"
        )
    return raw


def _kdf_costs(entry: dict[str, Any]) -> tuple[int, int, int]:
    """Argon2id parameters, JSON integers (not bools, floats or strings) within the bounds a
    reader allows, so a hostile config cannot make it allocate without limit."""
    names = ("time_cost", "memory_kib", "parallelism")
    if not all(type(entry.get(name)) is int for name in names):
        raise RepositoryError("repository config: malformed key entry (KDF parameters)")
    time_cost, memory_kib, lanes = (int(entry[name]) for name in names)
    if not (1 <= time_cost <= 64 and 8 <= memory_kib <= 4 * 1024 * 1024 and 1 <= lanes <= 64):
        raise RepositoryError("repository config: key entry has out-of-range KDF parameters")
    return time_cost, memory_kib, lanes


def derive_kek(
    passphrase: bytes, salt: bytes, time_cost: int, memory_kib: int, lanes: int
) -> bytes:
    return hash_secret_raw(
        passphrase,
        salt,
        time_cost=time_cost,
        memory_cost=memory_kib,
        parallelism=lanes,
        hash_len=32,
        type=Type.ID,
    )


def wrap_key(key: RepositoryKey, passphrase: bytes, repo_id: str, label: str) -> dict[str, Any]:
    """One entry of the config's "keys" list: the repository key sealed by a passphrase."""
    salt = os.urandom(SALT_SIZE)
    memory_kib = DEFAULT_MEMORY_KIB
    kek = derive_kek(passphrase, salt, DEFAULT_TIME_COST, memory_kib, DEFAULT_PARALLELISM)
    nonce = os.urandom(NONCE_SIZE)
    sealed = AESGCM(kek).encrypt(nonce, key.to_bytes(), KEY_AAD_PREFIX + repo_id.encode())
    return {
        "id": os.urandom(4).hex(),
        "label": label,
        "kdf": "argon2id",
        "time_cost": DEFAULT_TIME_COST,
        "memory_kib": memory_kib,
        "parallelism": DEFAULT_PARALLELISM,
        "salt": _b64(salt),
        "nonce": _b64(nonce),
        "wrapped": _b64(sealed),
    }


def unwrap_key(
    entries: list[dict[str, Any]], passphrase: bytes, repo_id: str
) -> tuple[RepositoryKey, str]:
    """Try every wrapped copy; returns the key and the id of the entry that opened."""
    for entry in entries:
        if not isinstance(entry, dict):
            raise RepositoryError("repository config: malformed key entry")
        if entry.get("kdf") != "argon2id":
            continue
        cost = _kdf_costs(entry)
        salt = _unb64(entry.get("salt"), SALT_SIZE, "salt")
        nonce = _unb64(entry.get("nonce"), NONCE_SIZE, "nonce")
        wrapped = _unb64(entry.get("wrapped"), WRAPPED_SIZE, "wrapped")
        kek = derive_kek(passphrase, salt, *cost)
        try:
            raw = AESGCM(kek).decrypt(nonce, wrapped, KEY_AAD_PREFIX + repo_id.encode())
        except InvalidTag:
            continue
        return RepositoryKey.from_bytes(raw), str(entry.get("id", ""))
    raise WrongPassphraseError("wrong passphrase: no key of this repository opens with it")


class Sealed:
    """A sealed object as the pieces whose concatenation it is (header and nonce, then the
    ciphertext), written as they are by writers that take pieces (docs/DATA-PATH.md, "CPU of
    a full backup"): the body is never copied into one more buffer. `take` hands the pieces
    over once, so a writer that must join them (object stores) frees them before it sends."""

    __slots__ = ("_length", "_parts")

    def __init__(self, parts: tuple[bytes, ...]) -> None:
        self._parts: list[bytes] | None = list(parts)
        self._length = sum(len(p) for p in parts)

    def __len__(self) -> int:
        return self._length

    @property
    def parts(self) -> list[bytes]:
        if self._parts is None:
            raise RuntimeError("a sealed object's pieces were already handed over")
        return self._parts

    def take(self) -> list[bytes]:
        """The pieces, this object keeping no reference to them (it cannot be written again)."""
        parts = self.parts
        self._parts = None
        return parts

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def write_into(self, view: memoryview) -> None:
        """The object's bytes into `view` (len(self) long): a pack's buffer."""
        at = 0
        for piece in self.parts:
            view[at : at + len(piece)] = piece
            at += len(piece)


class DeferredSealed(Sealed):
    """A blob sealed where it is written (docs/DATA-PATH.md, "Direct pack writes"): into a
    pack's page-aligned buffer by `write_into` (AES-GCM's encrypt_into: no ciphertext object
    and no copy of it), else the first time its pieces are asked for. Holds the plaintext
    until then, so it must be written while that is unchanged (within the store call)."""

    __slots__ = ("_aad", "_aead", "_nonce", "_plain", "_prefix")

    def __init__(
        self, aead: AESGCM | None, head: bytes, plain: bytes | memoryview, aad: bytes
    ) -> None:
        self._aead = aead
        self._nonce = os.urandom(NONCE_SIZE) if aead is not None else b""
        self._prefix = head + self._nonce
        self._plain: bytes | memoryview | None = plain
        self._aad = aad
        self._parts = None
        self._length = len(self._prefix) + len(plain) + (TAG_SIZE if aead is not None else 0)

    @property
    def parts(self) -> list[bytes]:
        plain = self._plain
        if plain is not None:
            aead = self._aead
            body = aead.encrypt(self._nonce, plain, self._aad) if aead else bytes(plain)
            self._parts, self._plain = [self._prefix, body], None
        return super().parts

    def write_into(self, view: memoryview) -> None:
        plain = self._plain
        if plain is None:
            super().write_into(view)
            return
        n = len(self._prefix)
        view[:n] = self._prefix
        if self._aead is None:
            view[n : self._length] = plain
        else:
            self._aead.encrypt_into(self._nonce, plain, self._aad, view[n : self._length])


class Sealer:
    """Encrypts and authenticates objects, or (unencrypted repository) only checksums them."""

    def __init__(self, key: RepositoryKey | None) -> None:
        self.key = key
        self._aead = AESGCM(key.data_key) if key else None

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        if self.key is None:
            return blake3.blake3(data).digest()
        return blake3.blake3(data, key=self.key.id_key).digest()

    def seal(self, head: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytes:
        """The object: `head` in clear, then the sealed body. Encrypted: nonce || ciphertext ||
        tag. Else: plaintext || BLAKE3(aad || plaintext). One join, so a 4 MiB body is copied
        once, not once per concatenation."""
        return bytes(self.seal_parts(head, plaintext, aad))

    def seal_deferred(self, head: bytes, plaintext: bytes | memoryview, aad: bytes) -> Sealed:
        """A blob (no checksum when unencrypted: its ID is its hash) sealed when written."""
        return DeferredSealed(self._aead, head, plaintext, aad)

    def seal_parts(self, head: bytes, plaintext: bytes | memoryview, aad: bytes) -> Sealed:
        """`seal`'s object as pieces, so that a writer that takes pieces (a pack, or
        LocalRemote.put_parts: writev) never copies a 4 MiB body into one more buffer."""
        if self._aead is None:
            digest = blake3.blake3(aad)
            digest.update(plaintext)
            return Sealed((head, bytes(plaintext), digest.digest()))
        nonce = os.urandom(NONCE_SIZE)
        return Sealed((head + nonce, self._aead.encrypt(nonce, plaintext, aad)))

    def open(self, sealed: bytes | memoryview, aad: bytes, what: str) -> bytes | memoryview:
        """A memoryview in, no 4 MiB copy made (an unencrypted body comes back as a view)."""
        if self._aead is None:
            body, check = sealed[:-32], sealed[-32:]
            digest = blake3.blake3(aad)
            digest.update(body)
            if len(sealed) < 32 or digest.digest() != check:
                raise IntegrityError(f"{what} is corrupt: checksum mismatch")
            return body
        try:
            return self._aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
        except (InvalidTag, ValueError) as exc:
            raise IntegrityError(f"{what} is corrupt: authentication failed") from exc
