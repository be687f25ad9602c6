"""What the S3 Object Lock tests share (test_s3_object_lock.py, test_s3_object_lock_format3.py):
a SeaweedFS server per test module with one bucket with Object Lock and one without, vmkeep
remotes in it under prefixes unique to each test, and the hash of a VM's disk."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.remotes.s3_server import SeaweedServer, started_or_skip
from vmkeep.remotes.s3 import S3Remote

LOCKED = "vmkeep-imm-lock"
PLAIN = "vmkeep-imm-plain"
PASS = b"object lock test passphrase"


def lock_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A module-scoped fixture's body (`yield from`): the server with both buckets."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs-lock"))
    with started_or_skip(server, (PLAIN,), (LOCKED,)):
        yield server


def remote_for(server: SeaweedServer, prefix: str, bucket: str = LOCKED) -> S3Remote:
    return server.remote(bucket, prefix)


def unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def disk_hash(vm_dir: Path) -> str:
    disk = json.loads((vm_dir / "vm.json").read_text())["disks"][0]["file"]
    return hashlib.sha256((vm_dir / disk).read_bytes()).hexdigest()
