"""A shut-off domain started (and even stopped again) while vmkeep reads its images with its own
qcow2 reader, which holds no image lock: the read is not one point in time, so neither a
restore point nor a replica may come out of it (real libvirtd + QEMU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.backup_points import (
    FaultAfterFirstChunk,
    backup,
    new_repo,
    offline_write,
    point_ids,
    wait_off,
)
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.replica_checks import cleanup
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.errors import ConnectorError
from vmkeep.operations.replication import ReplicateOptions, replicate
from vmkeep.progress import SilentProgress

MiB = lv.MiB
__all__ = ["cleanup"]  # a fixture, used by name


def start_and_stop(d: lv.TestDomain) -> None:
    d.start()
    d.stop()
    wait_off(d)


def shut_off_domain(make_domain: object) -> lv.TestDomain:
    d: lv.TestDomain = make_domain((24 * MiB,), start=False)  # type: ignore[operator]
    offline_write(d, "vda", 0, 0x21, 12 * MiB)  # several chunks: the read goes on after one
    return d


def test_backup_of_a_domain_started_mid_read_writes_no_point(
    make_domain: object, connector: LibvirtConnector, tmp_path: Path
) -> None:
    repo = new_repo(tmp_path / "repo")
    d = shut_off_domain(make_domain)
    with pytest.raises(ConnectorError, match="changed while it was read") as info:
        backup(repo, connector, d, "full", FaultAfterFirstChunk(lambda: start_and_stop(d)))
    assert "\n" not in str(info.value)
    assert point_ids(repo) == []
    good = backup(repo, connector, d, "full")  # untouched since: a good point
    assert point_ids(repo) == [good.restore_point]


def test_full_replication_of_a_source_started_mid_copy_makes_no_replica(
    libvirt_env: LibvirtEnv, make_domain: object, cleanup: list[str]
) -> None:
    d = shut_off_domain(make_domain)
    cleanup.append(d.name + "-replica")
    opts = ReplicateOptions(d.name, libvirt_env.pool.name, "full", keep=2, uri=lv.URI)
    with pytest.raises(ConnectorError, match="changed while it was read"):
        replicate(opts, FaultAfterFirstChunk(lambda: start_and_stop(d)))
    names = {dom.name() for dom in libvirt_env.conn.listAllDomains(0)}
    assert not [n for n in names if n.startswith(d.name + "-replica")]
    libvirt_env.pool.pool.refresh(0)
    volumes = [v.name() for v in libvirt_env.pool.pool.listAllVolumes(0)]
    assert not [v for v in volumes if v.startswith(d.name + "-replica")], volumes
    assert replicate(opts, SilentProgress()).fresh  # and the next run is fine
