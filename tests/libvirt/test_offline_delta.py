"""Offline incrementals and `--offline` backups against a real libvirtd + QEMU.

A delta chain crosses the running/shut-off boundary both ways: live full -> stop -> offline
delta (qemu-nbd --bitmap: only the chunks written before and after the stop are read) -> start
-> live delta -> stop -> offline delta. Every point is restored and hash-compared with the
disks as they were at its backup. Lost or hand-removed bitmaps fall back to a full read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.libvirt import libvirt_env as lv
from tests.libvirt.backup_points import (
    FaultAfterFirstChunk,
    backup,
    dirty_chunks,
    image_bitmaps,
    models,
    new_repo,
    offline_write,
    point_ids,
    restored_hashes,
    vmkeep_checkpoints,
    wait_off,
)
from tests.libvirt.conftest import LibvirtEnv
from vmkeep.connectors.libvirt import LibvirtConnector
from vmkeep.connectors.libvirt.power import OfflinePolicy
from vmkeep.errors import ConnectorError

MiB = lv.MiB


def test_delta_chain_across_stop_and_start(
    libvirt_env: LibvirtEnv, make_domain: object, connector: LibvirtConnector, tmp_path: Path
) -> None:
    repo = new_repo(tmp_path / "repo")
    d = make_domain((48 * MiB, 16 * MiB))  # type: ignore[operator]
    d.guest_write("vda", 0, os.urandom(5 * MiB))
    d.guest_write("vdb", 8 * MiB, 0x3C, MiB)
    points = []

    full = backup(repo, connector, d, "full")
    points.append((full.restore_point, models(d)))
    (cp_full,) = vmkeep_checkpoints(d)

    # Written while running, then the VM stops; more written while it is off (qemu-io).
    d.guest_write("vda", 20 * MiB + 4096, os.urandom(8192))
    d.stop()
    wait_off(d)
    offline_write(d, "vdb", 12 * MiB, 0x5E, 4096)
    off1 = backup(repo, connector, d, "delta")
    assert not d.dom.isActive(), "an offline backup must not start the VM"
    assert any("delta against checkpoint" in n for n in off1.notes), off1.notes
    assert off1.stats.bytes_chunks == dirty_chunks(("vda", 20 * MiB, 8192), ("vdb", 12 * MiB, 4096))
    points.append((off1.restore_point, models(d)))
    (cp_off1,) = vmkeep_checkpoints(d)  # made offline; the live one was pruned (keep 1)
    assert cp_off1 != cp_full
    assert image_bitmaps(d) == {"vda": [cp_off1], "vdb": [cp_off1]}

    # Started again: libvirt takes the offline checkpoint as the base of a live delta.
    d.start()
    d.guest_write("vda", 40 * MiB, 0x71, 64 * 1024)
    live = backup(repo, connector, d, "delta")
    assert not any("full read" in n for n in live.notes), live.notes
    assert live.stats.bytes_chunks == dirty_chunks(("vda", 40 * MiB, 64 * 1024))
    points.append((live.restore_point, models(d)))
    (cp_live,) = vmkeep_checkpoints(d)

    # And back to offline from the live checkpoint: nothing changed, nothing read.
    d.stop()
    wait_off(d)
    off2 = backup(repo, connector, d, "delta")
    assert off2.stats.bytes_read == off2.stats.bytes_chunks == 0, off2.notes
    points.append((off2.restore_point, models(d)))
    (cp_off2,) = vmkeep_checkpoints(d)
    assert cp_off2 != cp_live and image_bitmaps(d) == {"vda": [cp_off2], "vdb": [cp_off2]}
    sockets = [s for p in lv.run_dirs(d.dom.UUIDString()) for s in p.glob("*.sock")]
    assert not sockets  # qemu-nbd sockets gone

    for i, (point, expected) in enumerate(points):
        assert restored_hashes(repo, point, tmp_path / f"r{i}") == expected, i


def test_lost_or_removed_bitmap_falls_back_to_full(
    libvirt_env: LibvirtEnv, make_domain: object, connector: LibvirtConnector, tmp_path: Path
) -> None:
    repo = new_repo(tmp_path / "repo")
    d = make_domain((32 * MiB,))  # type: ignore[operator]
    d.guest_write("vda", 0, os.urandom(6 * MiB))
    backup(repo, connector, d, "full")
    # QEMU crashes: its bitmaps are never stored in the image.
    d.guest_write("vda", 16 * MiB, os.urandom(4096))
    d.kill_qemu()
    crashed = backup(repo, connector, d, "delta")
    assert any(
        ("has no bitmap" in n or "not stored cleanly" in n) and "full read" in n
        for n in crashed.notes
    ), crashed.notes
    assert crashed.stats.bytes_chunks == dirty_chunks(("vda", 0, 6 * MiB), ("vda", 16 * MiB, 4096))
    assert restored_hashes(repo, crashed.restore_point, tmp_path / "a") == models(d)
    (cp,) = vmkeep_checkpoints(d)  # the stale live checkpoint's metadata is gone too
    assert image_bitmaps(d) == {"vda": [cp]}

    # Someone removes the bitmap by hand while libvirt still lists the checkpoint.
    lv_img = d.disk("vda").path
    import subprocess

    subprocess.run(["qemu-img", "bitmap", "--remove", str(lv_img), cp], check=True)
    offline_write(d, "vda", 30 * MiB, 0x42, 4096)
    again = backup(repo, connector, d, "delta")
    assert any("full read" in n for n in again.notes), again.notes
    assert again.stats.bytes_chunks == dirty_chunks(
        ("vda", 0, 6 * MiB), ("vda", 16 * MiB, 4096), ("vda", 30 * MiB, 4096)
    )
    assert restored_hashes(repo, again.restore_point, tmp_path / "b") == models(d)
    (cp2,) = vmkeep_checkpoints(d)
    assert cp2 != cp and image_bitmaps(d) == {"vda": [cp2]}

    # An image vmkeep may read but not write (immutable): no new checkpoint, but the backup is
    # made (still a delta on cp2), and the next one reads in full.
    offline_write(d, "vda", 20 * MiB, 0x24, 4096)
    subprocess.run(["chattr", "+i", str(lv_img)], check=True)
    try:
        frozen = backup(repo, connector, d, "delta")
    finally:
        subprocess.run(["chattr", "-i", str(lv_img)], check=True)
    assert any("no checkpoint could be made" in n for n in frozen.notes), frozen.notes
    assert frozen.stats.bytes_chunks == dirty_chunks(("vda", 20 * MiB, 4096)), frozen.notes
    assert vmkeep_checkpoints(d) == [cp2] and image_bitmaps(d) == {"vda": [cp2]}
    assert restored_hashes(repo, frozen.restore_point, tmp_path / "c") == models(d)
    thawed = backup(repo, connector, d, "delta")
    assert any("has no checkpoint" in n for n in thawed.notes), thawed.notes
    assert restored_hashes(repo, thawed.restore_point, tmp_path / "d") == models(d)


def test_offline_option_timeout_force_and_failure(
    libvirt_env: LibvirtEnv, make_domain: object, connector: LibvirtConnector, tmp_path: Path
) -> None:
    """A guest-less domain ignores ACPI: without force-off the run fails cleanly and the VM
    keeps running; with it, the VM is powered off gracefully, backed up offline and started
    again; a backup that fails after the shutdown still starts it again."""
    repo = new_repo(tmp_path / "repo")
    d = make_domain((32 * MiB,))  # type: ignore[operator]
    d.guest_write("vda", MiB, os.urandom(2 * MiB))

    connector.offline = OfflinePolicy(shutdown_timeout=1.5, force_off=False)
    with pytest.raises(ConnectorError, match=r"did not shut down within \d+ s .*--force-off") as e:
        backup(repo, connector, d, "full")
    assert "\n" not in str(e.value)
    assert d.dom.isActive() and point_ids(repo) == [] and vmkeep_checkpoints(d) == []

    connector.offline = OfflinePolicy(shutdown_timeout=1.0, force_off=True)
    full = backup(repo, connector, d, "full")
    assert d.dom.isActive(), "the VM must be running again after an --offline backup"
    assert any("shut off" in n for n in full.notes), full.notes
    assert any("ignored the ACPI shutdown request" in n for n in full.notes), full.notes
    assert restored_hashes(repo, full.restore_point, tmp_path / "a") == models(d)

    # The graceful power-off stored the bitmaps: the next --offline run is a delta.
    d.guest_write("vda", 24 * MiB, 0x24, 4096)
    delta = backup(repo, connector, d, "delta")
    assert delta.stats.bytes_chunks == dirty_chunks(("vda", 24 * MiB, 4096)), delta.notes
    assert restored_hashes(repo, delta.restore_point, tmp_path / "b") == models(d)
    assert d.dom.isActive()
    kept = vmkeep_checkpoints(d)

    # A failure after the shutdown (here: the remote refuses writes): VM started again, no
    # point, the checkpoint this run made is removed from libvirt and from the image.
    d.guest_write("vda", 4 * MiB, os.urandom(4096))

    def remote_breaks() -> None:
        raise ConnectorError("injected: the remote went away")

    with pytest.raises(ConnectorError, match="injected"):
        backup(repo, connector, d, "delta", FaultAfterFirstChunk(remote_breaks))
    assert d.dom.isActive()
    assert len(point_ids(repo)) == 2
    assert vmkeep_checkpoints(d) == kept


def test_cli_offline_flags(libvirt_env: LibvirtEnv, make_domain: object, tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    d = make_domain((16 * MiB,))  # type: ignore[operator]
    d.guest_write("vda", 0, os.urandom(MiB))
    args = ("--connector", "libvirt", "--remote", str(repo), "--offline", "--json")
    refused = cli("backup", d.name, *args, "--shutdown-timeout", "1", ok=False)
    assert "did not shut down" in refused.err and d.dom.isActive()
    out = cli("backup", d.name, *args, "--shutdown-timeout", "1", "--force-off").json()
    assert d.dom.isActive() and out["bytes_chunks"] == 4 * MiB
    wrong = cli("backup", str(tmp_path), "--offline", "--remote", str(repo), ok=False)
    assert "--offline needs --connector libvirt" in wrong.err
