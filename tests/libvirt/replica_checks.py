"""What the replication tests share: cleanup of the replicas a test makes, one replication run,
and the comparisons (replica volumes and snapshots read with qemu-img against the test's model of
the source disks)."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.conftest import LibvirtEnv
from vmkeep.connectors.libvirt.backup import checkpoints
from vmkeep.connectors.libvirt.replica.domains import disk_paths
from vmkeep.operations.replication import ReplicateOptions, replicate
from vmkeep.operations.replication.report import ReplicationReport
from vmkeep.progress import SilentProgress

MiB = lv.MiB
GRAN = lv.DEFAULT_GRANULARITY
SIZES = (32 * MiB, 16 * MiB)


@pytest.fixture
def cleanup(libvirt_env: LibvirtEnv) -> Iterator[list[str]]:
    """Name prefixes of replica domains/volumes the test made: all removed at the end."""
    prefixes: list[str] = []
    yield prefixes
    import libvirt

    conn = libvirt_env.conn if libvirt_env.alive() else libvirt_env.reconnect()
    for dom in conn.listAllDomains(0):
        if any(dom.name().startswith(p) for p in prefixes):
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefineFlags(lv._UNDEFINE_FLAGS())
    pool = libvirt_env.pool.pool
    pool.refresh(0)
    for vol in pool.listAllVolumes(0):
        if any(vol.name().startswith(p) for p in prefixes):
            with contextlib.suppress(libvirt.libvirtError):
                vol.delete(0)


def run(
    env: LibvirtEnv, d: lv.TestDomain, mode: str = "incremental", keep: int = 3, **kw: Any
) -> ReplicationReport:
    opts = ReplicateOptions(d.name, env.pool.name, mode=mode, keep=keep, uri=lv.URI)
    return replicate(opts, kw.get("progress") or SilentProgress())


def raw(path: str, tmp: Path, snapshot: str | None = None) -> bytes:
    out = tmp / "raw.img"
    out.unlink(missing_ok=True)
    cmd = ["qemu-img", "convert", "-O", "raw"]
    if snapshot:
        cmd += ["-l", f"snapshot.name={snapshot}"]
    subprocess.run([*cmd, path, str(out)], check=True, capture_output=True)
    return out.read_bytes()


def replica_images(env: LibvirtEnv, name: str, tmp: Path, snapshot: str | None = None) -> dict:
    dom = env.conn.lookupByName(name)
    return {t: sha(raw(p, tmp, snapshot)) for t, p in disk_paths(dom).items()}


def sha(b: bytes | bytearray) -> str:
    return hashlib.sha256(b).hexdigest()


def models(d: lv.TestDomain) -> dict[str, str]:
    return {disk.target: sha(disk.model) for disk in d.disks}


def repl_checkpoints(d: lv.TestDomain) -> list[str]:
    return checkpoints.vmkeep_checkpoints(d.dom, checkpoints.REPLICATION_PREFIX)
