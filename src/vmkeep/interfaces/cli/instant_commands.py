"""`vmkeep restore --instant` (libvirt): rendering around operations/instant_restore.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .context import connector_for
from .output import RichProgress, console, print_json

if TYPE_CHECKING:
    from vmkeep.repository.repository import Repository


def restore_instant(
    repo: Repository,
    point: str,
    pool: str,
    name: str | None,
    uri: str | None,
    keep_macs: bool,
    bandwidth: int,
    json_out: bool,
) -> None:
    from vmkeep.connectors.libvirt import LibvirtConnector
    from vmkeep.operations.instant_restore import instant_restore

    connector = connector_for("libvirt", uri)
    assert isinstance(connector, LibvirtConnector)
    connector.keep_macs = keep_macs

    def running(domain: str, seconds: float) -> None:
        if not json_out:
            console.print(
                f"domain {domain} running after {seconds:.1f} s (reading from the restore "
                "point); copying its disks now",
                highlight=False,
            )

    report = instant_restore(
        repo, connector, point, pool, RichProgress(not json_out), name, bandwidth, running
    )
    if json_out:
        print_json(report.to_json())
        return
    console.print(
        f"restored {report.restore_point} as {report.name}: running after "
        f"{report.seconds_to_running:.1f} s, disks copied in {report.duration:.1f} s",
        highlight=False,
    )
