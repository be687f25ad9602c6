"""A counting spy around a real remote: every request still goes to the real remote, and the
spy counts them by (method, first path component), e.g. ("get", "manifests")."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from vmkeep.remotes.base import ObjectStat, Remote, put_parts
from vmkeep.repository.manifest import DiskIndex, Manifest, new_point_id
from vmkeep.repository.repository import Repository


class CountingRemote:
    def __init__(self, inner: Remote) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self.delete_delay = 0.0  # seconds each delete waits, so that overlaps show
        self.deleting = self.most_deleting = 0

    def _count(self, method: str, name: str) -> None:
        with self._lock:
            self.calls[(method, name.split("/", 1)[0])] += 1

    def put(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        self._count("put", name)
        self.inner.put(name, data, overwrite=overwrite)

    def put_parts(self, name: str, parts: list[bytes]) -> None:
        """A put in pieces (formats 1/2 chunk objects, packs) is a put like any other."""
        self._count("put", name)
        put_parts(self.inner, name, parts)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self._count("get", name)
        return self.inner.get(name, offset, length)

    def stat(self, name: str) -> ObjectStat | None:
        self._count("stat", name)
        return self.inner.stat(name)

    def list(self, prefix: str) -> Iterator[ObjectStat]:
        self._count("list", prefix)
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self._count("delete", name)
        with self._lock:
            self.deleting += 1
            self.most_deleting = max(self.most_deleting, self.deleting)
        try:
            time.sleep(self.delete_delay)
            self.inner.delete(name)
        finally:
            with self._lock:
                self.deleting -= 1

    def __getattr__(self, name: str) -> Any:  # flush, free_space, purge_incomplete, ...
        attr = getattr(self.inner, name)
        if name == "get_direct":  # a local remote's O_DIRECT read is a get like any other

            def get_direct(name: str, offset: int, into: memoryview) -> memoryview | None:
                self._count("get", name)
                got: memoryview | None = attr(name, offset, into)
                return got

            return get_direct
        return attr


def spied(repo: Repository) -> tuple[Repository, CountingRemote]:
    """The same repository (config, key) seen through a counting spy."""
    spy = CountingRemote(repo.remote)
    return Repository(spy, repo.config, repo.key), spy  # type: ignore[arg-type]


def tiny_point(
    repo: Repository,
    vm: int,
    when: datetime,
    chunk_ids: list[bytes],
    schedule: str = "",
    point_id: str | None = None,
) -> Manifest:
    """A restore point of VM number `vm` written straight through the repository API (its
    chunks need not exist: what is tested here reads manifests, not data)."""
    size = len(chunk_ids) * repo.chunk_size
    manifest = Manifest(
        id=point_id or new_point_id(when),
        vm={"name": f"vm{vm:03d}", "uuid": f"uuid-{vm:03d}", "metadata": {"vmkeep.tags": ["t"]}},
        disks=[DiskIndex("disk0", size, "raw", b"".join(chunk_ids), chunk_size=repo.chunk_size)],
        mode="full",
        created=when,
        finished=when + timedelta(seconds=1),
        schedule=schedule,
        stats={"bytes_read": size, "bytes_new": 1, "bytes_written": 1},
    )
    repo.save_manifest(manifest)
    return manifest


def many_points(
    repo: Repository, count: int, vms: int = 5, start: datetime | None = None
) -> list[Manifest]:
    """`count` points, round robin over `vms` VMs, an hour apart from `start` (default
    2026-01-01), each with its own chunk ID."""
    start = start or datetime(2026, 1, 1, tzinfo=UTC)
    return [
        tiny_point(repo, i % vms, start + timedelta(hours=i), [(i + 1).to_bytes(32, "big")])
        for i in range(count)
    ]
