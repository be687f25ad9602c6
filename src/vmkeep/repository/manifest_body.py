"""A manifest's JSON document written and read without whole-document transient copies.

The document of a fully allocated 8 TiB disk holds 64 MiB of chunk IDs as one base64 string.
json.dumps of the whole document, its .encode(), the base64 text and its str made ~4.7 copies
of the ID table at once (299 MiB at 8 TiB). Here the body is written as pieces: the small
JSON parts by json.dumps, the runs and the base64 text in bounded pieces, straight into a
streaming zstd compressor that is told the body's length first (so the frame records its
content size, as the one-shot compressor's did, and a decoder never has to guess). The text
is byte for byte what json.dumps of the whole document gives (docs/DATA-PATH.md, "Manifest
memory"). Reading (parse_document) never makes str of the IDs' text: the disks' base64
strings are cut out of the decompressed bytes before json.loads and decoded in place.
"""

from __future__ import annotations

import binascii
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import zstandard

from vmkeep.errors import RepositoryError

from .format import ID_SIZE
from .index_runs import Run
from .limits import MAX_MANIFEST_DOC

ID_PIECE = 3 << 18  # IDs base64-encoded at once (768 KiB; a multiple of 3, so pieces join)
FLUSH = 1 << 20  # body text handed to the compressor at once
RUNS_BATCH = 4096  # runs rendered as text at once
LEVEL = 3  # zstd level of every manifest (the index of IDs is what makes them big)
# Reading: a JSON string token with escapes (skipped as JSON skips them). String tokens of at
# least BIG_STRING bytes without escapes are left out of what json.loads sees (in UTF-8, `"`
# and the backslash never occur inside a multi-byte character).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
BIG_STRING = 4096

# A disk's small fields, its runs; None: no runs nor chunks (a version 2 object's table disk,
# whose fields carry its `table`).
DiskParts = tuple[dict[str, Any], list[Run] | None]


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _runs_text(runs: list[Run]) -> Iterator[str]:
    """`[[first,count],...]` as json.dumps writes it, RUNS_BATCH runs a piece."""
    yield "["
    for at in range(0, len(runs), RUNS_BATCH):
        batch = ",".join(
            f"[{first},{len(ids) // ID_SIZE}]" for first, ids in runs[at : at + RUNS_BATCH]
        )
        yield batch if at == 0 else "," + batch
    yield "]"


def _id_pieces(runs: list[Run]) -> Iterator[bytes | memoryview]:
    """The runs' IDs concatenated, cut in pieces of a multiple of 3 bytes (but the last), so
    that their base64 texts joined are the base64 text of the whole."""
    carry = b""
    for _, ids in runs:
        view = memoryview(ids)
        if carry:
            take = 3 - len(carry)
            carry += bytes(view[:take])
            view = view[take:]
            if len(carry) < 3:
                continue
            yield carry
            carry = b""
        whole = len(view) - len(view) % 3
        for at in range(0, whole, ID_PIECE):
            yield view[at : min(at + ID_PIECE, whole)]
        carry = bytes(view[whole:])
    if carry:
        yield carry


def _b64_length(nbytes: int) -> int:
    return 4 * -(-nbytes // 3)


def _disk_prefix(fields: dict[str, Any]) -> str:
    return _dumps(fields)[:-1] + ',"runs":'


def body_length(head: dict[str, Any], disks: list[DiskParts]) -> int:
    """Bytes of the document's text (ASCII: json.dumps escapes everything else)."""
    total = len(_dumps(head)) + len(',"disks":[]') + max(0, len(disks) - 1)
    for fields, runs in disks:
        if runs is None:
            total += len(_dumps(fields))
            continue
        total += len(_disk_prefix(fields)) + sum(len(t) for t in _runs_text(runs))
        total += len(',"chunks":""}') + _b64_length(sum(len(ids) for _, ids in runs))
    return total


class _Compressing:
    """Text written in pieces, compressed in FLUSH-sized steps into one growing buffer."""

    def __init__(self, size: int) -> None:
        self._zstd = zstandard.ZstdCompressor(level=LEVEL).compressobj(size=size)
        self._text = bytearray()
        self.out = bytearray()
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        self._text += data
        self.written += len(data)
        if len(self._text) >= FLUSH:
            self._drain()

    def _drain(self) -> None:
        self.out += self._zstd.compress(self._text)
        self._text.clear()

    def finish(self) -> bytearray:
        self._drain()
        self.out += self._zstd.flush()
        return self.out


def compressed_body(what: str, head: dict[str, Any], disks: list[DiskParts]) -> bytearray:
    """The zstd frame of `{**head, "disks": [{**fields, "runs": .., "chunks": ..}, ..]}` as
    compact JSON; a document over MAX_MANIFEST_DOC is refused before any work (it could never
    be read back)."""
    size = body_length(head, disks)
    if size > MAX_MANIFEST_DOC:
        raise RepositoryError(
            f"{what}: its index takes {size} bytes, more than the {MAX_MANIFEST_DOC} a "
            "manifest may hold; use a repository with larger chunks"
        )
    sink = _Compressing(size)
    sink.write(_dumps(head)[:-1].encode() + b',"disks":[')
    for k, (fields, runs) in enumerate(disks):
        if runs is None:
            sink.write((("," if k else "") + _dumps(fields)).encode())
            continue
        sink.write((("," if k else "") + _disk_prefix(fields)).encode())
        for text in _runs_text(runs):
            sink.write(text.encode())
        sink.write(b',"chunks":"')
        for piece in _id_pieces(runs):
            sink.write(binascii.b2a_base64(piece, newline=False))
        sink.write(b'"}')
    sink.write(b"]}")
    if sink.written != size:  # a bug here would make every later read fail: never store it
        raise AssertionError(f"manifest body is {sink.written} bytes, {size} were announced")
    return sink.finish()


def document_text(body: bytes) -> str:
    """`body` as text, in the encoding json.loads would detect."""
    return body.decode(json.detect_encoding(body), "surrogatepass")


def parse_document(holder: list[bytes]) -> Any:
    """The document whose text is the one item of `holder` (taken out of it, so that it is
    freed here). The disks' base64 strings are never made str: they are cut out of the text
    (a placeholder with a random tag each), json.loads parses the rest, and each disk's IDs
    are decoded from the bytes in place: the text and the IDs exist, never also the text's
    str and the base64 strs (2.3x the ID table, not 2.7x). A document in which the cut
    strings are not exactly the disks' `chunks` (a long base64 string elsewhere, a duplicate
    key, another encoding) is parsed whole, as before."""
    body = holder.pop()
    spans = _big_strings(body) if json.detect_encoding(body) == "utf-8" else []
    if spans:
        tag = f"\x00{os.urandom(8).hex()}:"
        doc = json.loads(document_text(_skeleton(body, spans, tag)))
        if _fill_chunks(doc, body, spans, tag):
            return doc
        del doc
    text = document_text(body)
    del body
    return json.loads(text)


def _big_strings(body: bytes) -> list[tuple[int, int]]:
    """(start, end) of each string token of BIG_STRING or more bytes without escapes, quotes
    included. Found with bytes.find (memchr): a regex over the IDs' text cost ~0.3 CPU-s at
    8 TiB. Whether one is base64 is a2b_base64's (strict) to say, for the disks' IDs; any
    other one cut out makes the document parsed whole."""
    spans: list[tuple[int, int]] = []
    at = body.find(b'"')
    while at != -1:
        end = body.find(b'"', at + 1)
        if end == -1:
            break  # unterminated: json.loads says so
        if body.find(b"\\", at + 1, end) != -1:  # escapes: the token ends where JSON says
            token = _STRING.match(body, at)
            if token is None:
                break
            end = token.end() - 1
        elif end + 1 - at >= BIG_STRING:
            spans.append((at, end + 1))
        at = body.find(b'"', end + 1)
    return spans


def _skeleton(body: bytes, spans: list[tuple[int, int]], tag: str) -> bytes:
    pieces: list[bytes] = []
    at = 0
    for k, (start, end) in enumerate(spans):
        pieces += (body[at:start], json.dumps(f"{tag}{k}").encode())
        at = end
    pieces.append(body[at:])
    return b"".join(pieces)


def _fill_chunks(doc: Any, body: bytes, spans: list[tuple[int, int]], tag: str) -> bool:
    """Each disk's `chunks` placeholder replaced by its IDs; False unless every cut string
    was one disk's `chunks`."""
    disks = doc.get("disks") if isinstance(doc, dict) else None
    if not isinstance(disks, list):
        return False
    filled: set[int] = set()
    view = memoryview(body)
    for disk in disks:
        text = disk.get("chunks") if isinstance(disk, dict) else None
        if isinstance(text, str) and text.startswith(tag):
            start, end = spans[int(text[len(tag) :])]
            disk["chunks"] = binascii.a2b_base64(view[start + 1 : end - 1], strict_mode=True)
            filled.add(start)
    return len(filled) == len(spans)


def ids_of(disk: dict[str, Any]) -> bytes:
    """A disk's `chunks` (base64) as bytes, the text dropped from `disk` once decoded (no
    ASCII copy of the text is made: binascii reads an ASCII str in place). parse_document
    may have decoded it already."""
    text = disk.pop("chunks")
    if isinstance(text, bytes):
        return text
    if not isinstance(text, str):
        raise ValueError("chunk IDs are not a string")
    return binascii.a2b_base64(text, strict_mode=True)
