"""A fast reading of ListObjectsV2 pages (docs/SCALE.md).

botocore parses every field of every listed object through its generic shape model: about
0.1 ms of CPU per object, a second per 10,000 restore points listed, which made a listing of
`manifests/` the largest cost of `vmkeep list` on S3 once the manifests themselves are cached.
A `before-parse` hook reads each successful page's Key, Size and LastModified with
ElementTree (C expat) instead, hands them over beside the parsed response, and leaves
botocore only the page without its entries (IsTruncated, NextContinuationToken, ...). Any
page it does not fully understand is left to botocore as it was."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus
from xml.etree import ElementTree

FAST_KEY = "VmkeepEntries"  # (key, size, mtime) of each listed object, in page order


def register_fast_listing(client: Any) -> None:
    client.meta.events.register("before-parse.s3.ListObjectsV2", _read_entries)


def listed_entries(page: Any) -> Iterator[tuple[str, int, float]]:
    """(key, size, mtime) of a listed page, read by the hook below or else by botocore."""
    if FAST_KEY in page:
        yield from page[FAST_KEY]
        return
    for obj in page.get("Contents", []):
        yield obj.get("Key", ""), int(obj.get("Size", 0)), obj["LastModified"].timestamp()


def _read_entries(
    response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any
) -> None:
    body = response_dict.get("body")
    if response_dict.get("status_code") != 200 or not isinstance(body, bytes):
        return
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != f"{ns}ListBucketResult":
        return
    encoded = root.findtext(f"{ns}EncodingType") == "url"
    contents = root.findall(f"{ns}Contents")
    entries: list[tuple[str, int, float]] = []
    try:
        for item in contents:
            key = item.findtext(f"{ns}Key")
            size = item.findtext(f"{ns}Size")
            modified = item.findtext(f"{ns}LastModified")
            if key is None or size is None or modified is None:
                return
            when = datetime.fromisoformat(modified).timestamp()
            entries.append((unquote_plus(key) if encoded else key, int(size), when))
    except ValueError:
        return
    for item in contents:
        root.remove(item)
    response_dict["body"] = ElementTree.tostring(root)
    customized_response_dict[FAST_KEY] = entries
