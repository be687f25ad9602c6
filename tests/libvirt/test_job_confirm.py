"""A restore point is written only if the backup job still runs when every disk has been read:
a job ended from outside during the read (here: `abortJob` from another client the moment the
last disk is read) may have let reads see the live disk, so the run fails in one line, lists
no point, leaves no checkpoint, and the next backup works (real libvirtd + QEMU)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.backup_points import (
    backup,
    models,
    new_repo,
    point_ids,
    restored_hashes,
    vmkeep_checkpoints,
)
from tests.libvirt.conftest import LibvirtEnv
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.errors import ConnectorError
from vmkeep.progress import SilentProgress

MiB = lv.MiB


class AbortWhenReadIsDone(SilentProgress):
    """Ends the domain's job from another connection as soon as a disk's read has finished
    (progress.finish() runs once per disk, after its last chunk)."""

    def __init__(self, abort: Callable[[], None]) -> None:
        self.abort: Callable[[], None] | None = abort

    def finish(self) -> None:
        if self.abort is not None:
            abort, self.abort = self.abort, None
            abort()


def test_job_ended_from_outside_writes_no_point(
    libvirt_env: LibvirtEnv, make_domain: Callable[..., lv.TestDomain], tmp_path: Path
) -> None:
    d = make_domain((16 * MiB,))
    d.guest_write("vda", MiB, 0x5A, MiB)
    repo = new_repo(tmp_path / "repo")
    connector = LibvirtConnector(lv.URI)
    try:
        outsider = libvirt_env.conn.lookupByName(d.name)  # another client's handle
        with pytest.raises(ConnectorError, match="ended before vmkeep finished"):
            backup(repo, connector, d, "full", AbortWhenReadIsDone(outsider.abortJob))
        assert point_ids(repo) == []
        assert vmkeep_checkpoints(d) == []
        assert not lv.job_active(d.dom)
        report = backup(repo, connector, d, "full")
    finally:
        connector.close()
    assert point_ids(repo) == [report.restore_point]
    assert restored_hashes(repo, report.restore_point, tmp_path / "restored") == models(d)
