"""The fast reading of S3 listings (remotes/s3_listing.py) against a real SeaweedFS: the same
names, sizes and times as botocore's own parse, odd names included, over several pages."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.remotes.s3_server import REGION, SeaweedServer
from tests.remotes.test_s3 import BUCKET, server  # noqa: F401  (the module's server fixture)
from vmkeep.remotes.s3 import S3Remote
from vmkeep.remotes.s3_listing import FAST_KEY

NAMES = [
    "manifests/20261206T072400.000Z-abcdef",
    "manifests/with space",
    "manifests/plus+sign",
    "manifests/percent%41",
    "manifests/ünïcødé",
    "manifests/amp&lt;",
    *(f"manifests/{i:04d}" for i in range(12)),
]


@pytest.fixture
def remote(server: SeaweedServer) -> Iterator[S3Remote]:  # noqa: F811
    prefix = f"listing-{uuid.uuid4().hex[:8]}"
    yield S3Remote(
        BUCKET, prefix, endpoint=server.endpoint, region=REGION, path_style=True, page_size=5
    )


def test_fast_listing_matches_botocore(remote: S3Remote, server: SeaweedServer) -> None:  # noqa: F811
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: remote.put(n, n.encode() * 3), NAMES))
    seen: list[bool] = []

    def record(parsed: dict[str, Any], **_: Any) -> None:
        seen.append(FAST_KEY in parsed)

    remote._client.meta.events.register("after-call.s3.ListObjectsV2", record)
    fast = {o.name: (o.size, o.mtime) for o in remote.list("manifests/")}
    assert seen and all(seen), "every page was read by the fast path"
    plain = server.client()  # botocore's own parse, no hook
    pages = plain.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=remote.prefix + "manifests/"
    )
    slow = {
        o["Key"][len(remote.prefix) :]: (o["Size"], o["LastModified"].timestamp())
        for page in pages
        for o in page.get("Contents", [])
    }
    assert fast == slow
    assert set(fast) == set(NAMES)
    assert all(size == len(name.encode()) * 3 for name, (size, _) in fast.items())
