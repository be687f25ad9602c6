"""A manifest's chunk IDs are now decoded straight from its base64 str (binascii in strict
mode, no ASCII copy): every text that is not exactly the base64 of whole IDs is a malformed
point (IntegrityError), never an internal error or IDs read from a shifted text; and a
document too big to read back is refused before it is compressed."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from vmkeep.errors import IntegrityError, RepositoryError
from vmkeep.repository import manifest_body
from vmkeep.repository.compression import compress
from vmkeep.repository.format import (
    DEFAULT_CHUNK_SIZE,
    FLAG_ENCRYPTED,
    FLAG_ZSTD,
    MANIFEST_MAGIC,
    header,
    manifest_object_name,
)
from vmkeep.repository.manifest import DiskIndex, Manifest, new_point_id
from vmkeep.repository.repository import Repository

IDS = bytes(range(32)) * 3  # three IDs: 96 bytes, 128 base64 characters
GOOD = base64.b64encode(IDS).decode()


def _point(repo: Repository, chunks: object) -> str:
    now = datetime.now(UTC)
    disk = DiskIndex("d", 3 * DEFAULT_CHUNK_SIZE, "raw", [(0, IDS)])
    doc: dict[str, Any] = Manifest(
        new_point_id(now), {"name": "v"}, [disk], "full", now, now
    ).to_json()
    doc["disks"][0]["chunks"] = chunks
    head = header(MANIFEST_MAGIC, FLAG_ZSTD | (FLAG_ENCRYPTED if repo.encrypted else 0))
    body = compress(json.dumps(doc).encode(), 3)
    blob = repo.sealer.seal(head, body, head + manifest_object_name(doc["id"]).encode())
    repo.remote.put(manifest_object_name(doc["id"]), blob)
    return str(doc["id"])


TEXTS: dict[str, object] = {
    "a number": 5,
    "a list": [GOOD],
    "not ascii": GOOD[:-4] + "\u00e9AAA",
    "padding inside": GOOD[:8] + "==" + GOOD[10:],
    "a newline": GOOD[:64] + "\n" + GOOD[64:],
    "a space": GOOD[:64] + " " + GOOD[64:],
    "a url-safe character": GOOD[:-1] + "-",
    "one character short": GOOD[:-1],
    "one group long": GOOD + "AAAA",
    "one group short": GOOD[:-4],
    "data after padding": base64.b64encode(IDS[:-1]).decode() + "AAAA",
}


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_a_bad_chunk_text_is_a_malformed_point(repo: Repository, text: object) -> None:
    point = _point(repo, text)
    with pytest.raises(IntegrityError, match="malformed"):
        repo.load_manifest(point)


def test_the_good_text_reads(repo: Repository) -> None:
    assert repo.load_manifest(_point(repo, GOOD)).disks[0].runs == [(0, IDS)]


def test_a_document_too_big_to_read_back_is_refused_before_writing(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(UTC)
    ids = bytes(32) + b"\x01" * 32 * 999
    disk = DiskIndex("d", 1000 * DEFAULT_CHUNK_SIZE, "raw", [(0, ids)])
    m = Manifest(new_point_id(now), {"name": "v"}, [disk], "full", now, now)
    monkeypatch.setattr(manifest_body, "MAX_MANIFEST_DOC", 40_000)  # the text is ~43 KB
    with pytest.raises(RepositoryError, match="more than the 40000"):
        repo.save_manifest(m)
    assert repo.point_ids() == []


LONG = base64.b64encode(bytes(range(256)) * 24).decode()  # 8 KiB of base64: cut out when read


def _doc(repo: Repository, ids: bytes) -> dict[str, Any]:
    now = datetime.now(UTC)
    count = len(ids) // 32
    disk = DiskIndex("d", count * DEFAULT_CHUNK_SIZE, "raw", [(0, ids)])
    return Manifest(new_point_id(now), {"name": "v"}, [disk], "full", now, now).to_json()


def _store(repo: Repository, raw: bytes, point: str) -> str:
    head = header(MANIFEST_MAGIC, FLAG_ZSTD | (FLAG_ENCRYPTED if repo.encrypted else 0))
    blob = repo.sealer.seal(head, compress(raw, 3), head + manifest_object_name(point).encode())
    repo.remote.put(manifest_object_name(point), blob)
    return point


BIG_IDS = bytes(range(256)) * 32  # 256 IDs, 11 KiB of base64


def test_a_long_base64_string_elsewhere_is_kept_as_text(repo: Repository) -> None:
    """A long base64 string in the VM's metadata is cut out like the IDs: the document is
    then parsed whole, and the string comes back as the string it was."""
    doc = _doc(repo, BIG_IDS)
    doc["vm"]["metadata"] = {"blob": LONG, LONG: [LONG]}
    point = _store(repo, json.dumps(doc).encode(), doc["id"])
    m = repo.load_manifest(point)
    assert m.vm["metadata"] == {"blob": LONG, LONG: [LONG]}
    assert m.disks[0].runs == [(0, BIG_IDS)]


def test_a_duplicate_chunks_key_reads_as_json_reads_it(repo: Repository) -> None:
    """json.loads keeps the last of two equal keys: so does the reader that cuts strings."""
    doc = _doc(repo, BIG_IDS)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    other = bytes(reversed(BIG_IDS))
    twice = b'"chunks":"' + base64.b64encode(other) + b'","chunks":'
    point = _store(repo, raw.replace(b'"chunks":', twice, 1), doc["id"])
    assert repo.load_manifest(point).disks[0].runs == [(0, BIG_IDS)]


def test_escaped_slashes_in_the_ids_read(repo: Repository) -> None:
    """JSON may escape `/` as `\\/`: such a string is not cut out, and reads as JSON says."""
    doc = _doc(repo, BIG_IDS)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    text = base64.b64encode(BIG_IDS)
    assert b"/" in text
    point = _store(repo, raw.replace(text, text.replace(b"/", b"\\/")), doc["id"])
    assert repo.load_manifest(point).disks[0].runs == [(0, BIG_IDS)]


def test_a_placeholder_like_string_is_only_text(repo: Repository) -> None:
    """The reader's placeholders carry a random tag: a document that writes one itself
    (here as the IDs) is malformed, never read as another string's IDs."""
    doc = _doc(repo, BIG_IDS)
    doc["vm"]["metadata"] = {"blob": LONG}
    doc["disks"][0]["chunks"] = "\u00000123456789abcdef:0"
    point = _store(repo, json.dumps(doc).encode(), doc["id"])
    with pytest.raises(IntegrityError, match="malformed"):
        repo.load_manifest(point)
