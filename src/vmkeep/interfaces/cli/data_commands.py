"""Commands that move VM data: backup, restore, export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vmkeep.errors import UsageError

from .context import connector_for, state
from .output import RichProgress, console, human_bytes, print_json
from .repo_commands import JsonOpt, RemoteOpt

if TYPE_CHECKING:
    from vmkeep.connectors.libvirt.connector import TcpExport

NBD_PORT = 10809  # connector.NBD_PORT (not imported here: the CLI loads libvirt lazily)
# Where a running domain's backup job exports its disks over a remote libvirt URI; `backup`
# and `replicate` take the same options (nbd_export() turns them into one value).
NbdHostOpt = typer.Option(
    None,
    "--nbd-host",
    help="libvirt, remote --uri: the hypervisor's address the job's NBD export listens on "
    "and vmkeep reads from; plain NBD over TCP is unencrypted: trusted networks only.",
)
NbdPortOpt = typer.Option(
    NBD_PORT, "--nbd-port", min=1, max=65535, help="Remote --uri: first NBD port tried."
)
NbdTlsOpt = typer.Option(
    False, "--nbd-tls", help="Remote --uri: NBD over TLS (libvirt's backup TLS set up)."
)
NbdTlsCertsOpt = typer.Option(
    "", "--nbd-tls-certs", help="--nbd-tls: dir with ca-cert.pem, client-cert/key.pem."
)


def nbd_export(host: str | None, port: int, tls: bool, certs: str) -> TcpExport:
    """The --nbd-* options as the connector takes them (a certificate dir implies TLS)."""
    from vmkeep.connectors.libvirt.connector import TcpExport

    return TcpExport(host, port, tls or bool(certs), certs)


def backup(
    vm: str = typer.Argument(..., help="The VM: its directory (files), or domain name/uuid."),
    remote: str | None = RemoteOpt,
    mode: str = typer.Option("full", "--mode", help="full or delta."),
    schedule: str = typer.Option("", "--schedule", help="Schedule tag (retention is per tag)."),
    compression_level: int = typer.Option(1, "--compression-level", help="zstd level, 0 = off."),
    connector: str = typer.Option("files", "--connector", help="files or libvirt."),
    uri: str | None = typer.Option(None, "--uri", help="libvirt URI (default qemu:///system)."),
    lock_days: int | None = typer.Option(
        None, "--lock-days", help="Lock this restore point N days (0: none); default: the remote's."
    ),
    keep_checkpoints: int = typer.Option(
        1,
        "--keep-checkpoints",
        min=1,
        help="libvirt: backup checkpoints left on the domain as rollback points (newest N).",
    ),
    offline: bool = typer.Option(
        False,
        "--offline",
        help="libvirt: shut a running domain down (ACPI), back it up offline, start it again.",
    ),
    shutdown_timeout: float = typer.Option(
        300.0, "--shutdown-timeout", min=0, help="--offline: seconds to wait for the guest."
    ),
    force_off: bool = typer.Option(
        False, "--force-off", help="--offline: power off a guest that ignores the shutdown."
    ),
    nbd_host: str | None = NbdHostOpt,
    nbd_port: int = NbdPortOpt,
    nbd_tls: bool = NbdTlsOpt,
    nbd_tls_certs: str = NbdTlsCertsOpt,
    max_rate: str | None = typer.Option(
        None,
        "--max-rate",
        help="Read the VM's disks at most this fast: 50MiB/s, 10MB/s or bytes per second.",
    ),
    json_out: bool = JsonOpt,
) -> None:
    """Back up a VM into a repository."""
    from vmkeep.trace import mark

    mark("cli")
    rate = parse_max_rate(max_rate)
    # The key is derived in a thread while the data path and the connector are imported
    # (imported when they run, not at every start-up of the CLI): docs/RUN-OVERHEAD.md.
    opening = state.begin_open_repository(remote)
    from vmkeep.operations.backup import BackupOptions, backup_vm
    from vmkeep.remotes.object_lock import apply_lock_policy

    lock = state.lock_policy(remote, lock_days)
    source = connector_for(connector, uri)
    options = BackupOptions(
        mode=mode, schedule=schedule, compression_level=compression_level, max_rate=rate
    )
    if keep_checkpoints != 1:
        keep_checkpoints_on(source, keep_checkpoints)
    if offline:
        offline_on(source, shutdown_timeout, force_off)
    if nbd_host is not None or nbd_tls or nbd_port != NBD_PORT or nbd_tls_certs:
        nbd_export_on(source, nbd_export(nbd_host, nbd_port, nbd_tls, nbd_tls_certs))
    mark("imported")
    vm_config = source.get_vm(vm)  # libvirt: connects and reads the domain meanwhile too
    mark("got_vm")
    repo = opening()
    mark("opened")
    apply_lock_policy(repo.remote, lock)
    report = backup_vm(repo, source, vm_config, options, RichProgress(not json_out), connector)
    if json_out:
        print_json(report.to_json())
        return
    j = report.to_json()
    console.print(
        f"restore point [bold]{report.restore_point}[/] of {report.vm} ({report.mode}): "
        f"read {human_bytes(j['bytes_read'])} in {j['duration']:.1f} s "
        f"({j['read_mb_per_s'] or 0:.0f} MB/s), stored {human_bytes(j['bytes_written'])} new; "
        f"dedup {j['dedup_ratio'] or '-'}x, compression {j['compression_ratio'] or '-'}x",
        highlight=False,
    )


def parse_max_rate(text: str | None) -> int | None:
    """--max-rate as bytes/s, read like a job file's `max_rate` (one parser for both)."""
    if text is None:
        return None
    from vmkeep.engine.jobs.units import parse_rate

    try:
        return parse_rate(text)
    except ValueError as exc:
        raise UsageError(f"--max-rate: {exc}") from None


def keep_checkpoints_on(source: object, keep: int) -> None:
    """--keep-checkpoints only means something to the libvirt connector."""
    from vmkeep.connectors.libvirt import LibvirtConnector

    if not isinstance(source, LibvirtConnector):
        raise UsageError("--keep-checkpoints needs --connector libvirt")
    source.keep_checkpoints = keep


def offline_on(source: object, shutdown_timeout: float, force_off: bool) -> None:
    """--offline only means something to the libvirt connector."""
    from vmkeep.connectors.libvirt import LibvirtConnector
    from vmkeep.connectors.libvirt.power import OfflinePolicy

    if not isinstance(source, LibvirtConnector):
        raise UsageError("--offline needs --connector libvirt")
    source.offline = OfflinePolicy(shutdown_timeout, force_off)


def nbd_export_on(source: object, export: TcpExport) -> None:
    """--nbd-*: where a remote libvirt URI's live backup job exports its disks."""
    from vmkeep.connectors.libvirt import LibvirtConnector

    if not isinstance(source, LibvirtConnector):
        raise UsageError("--nbd-host/--nbd-port/--nbd-tls need --connector libvirt")
    source.nbd = export


def restore(
    point: str = typer.Argument(..., help="Restore point id (or a unique prefix)."),
    to: str | None = typer.Option(
        None,
        "--to",
        help="files: parent directory of the new VM (with --in-place, the VM's directory); "
        "libvirt: the storage pool of the new domain's volumes (default: the pool 'default'); "
        "with --in-place, the domain (default: the point's VM, by uuid then name).",
    ),
    name: str | None = typer.Option(
        None,
        "--name",
        help="Name of the new VM (default: the point's VM name, or <name>-restored-<point "
        "time> when that exists).",
    ),
    in_place: bool = typer.Option(
        False,
        "--in-place",
        help="Overwrite the original VM, writing only chunks that differ; it keeps its identity.",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="With --in-place: overwrite a VM of another uuid too; libvirt: a running target "
        "domain is first powered off hard (virsh destroy: no guest shutdown, its unsaved "
        "state is lost) instead of refused.",
    ),
    keep_macs: bool = typer.Option(
        False, "--keep-macs", help="libvirt: the new domain keeps the original MAC addresses."
    ),
    connector: str = typer.Option("files", "--connector", help="files or libvirt."),
    uri: str | None = typer.Option(None, "--uri", help="libvirt URI (default qemu:///system)."),
    instant: bool = typer.Option(
        False,
        "--instant",
        help="libvirt, local URI: start the new domain at once on vmkeep's NBD export of the "
        "point, copy the data into its volumes in the background, return when done "
        "(docs/MOUNT-EXPORT.md §5).",
    ),
    bandwidth: int = typer.Option(
        100, "--bandwidth", help="With --instant: copy speed limit per disk in MiB/s (0: none)."
    ),
    remote: str | None = RemoteOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Restore a VM from a restore point, as a new VM (new uuid) or in place."""
    from vmkeep.trace import mark

    mark("cli")
    # As backup: the key is derived in a thread while the data path and the target's
    # connector are imported (the files connector alone ~0.14 s; docs/DATA-PATH.md).
    opening = state.begin_open_repository(remote)
    from vmkeep.operations.restore import restore_vm

    target_connector = None if instant else connector_for(connector, uri)
    mark("imported")
    repo = opening()
    mark("opened")
    point = repo.resolve_point(point)  # a bad id fails before anything is created
    if target_connector is None:
        from .instant_commands import restore_instant

        if connector != "libvirt" or in_place:
            raise UsageError("--instant restores a new domain: it needs --connector libvirt")
        restore_instant(repo, point, to or "", name, uri, keep_macs, bandwidth, json_out)
        return
    target = to or ""
    if connector == "libvirt":
        from vmkeep.connectors.libvirt import LibvirtConnector
        from vmkeep.connectors.libvirt.restore.in_place import in_place_target

        assert isinstance(target_connector, LibvirtConnector)
        target_connector.keep_macs = keep_macs
        target_connector.power_off_running = force and in_place
        if in_place:
            manifest = repo.load_manifest(repo.resolve_point(point))
            refs = (to,) if to else (manifest.vm_uuid, manifest.vm_name)
            target = in_place_target(target_connector, target_connector.uri, *refs)
    elif keep_macs:
        raise UsageError("--keep-macs needs --connector libvirt")
    elif not to:
        raise UsageError(f"--to is required with --connector {connector}")
    elif not in_place:
        folder = Path(to)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"restore target {to} is not a directory")
        folder.mkdir(parents=True, exist_ok=True)
    report = restore_vm(
        repo,
        target_connector,
        point,
        target,
        RichProgress(not json_out),
        name=name,
        in_place=in_place,
        force=force,
    )
    if json_out:
        print_json(report.to_json())
        return
    console.print(
        f"restored {report.restore_point} to {report.location}: "
        f"{human_bytes(report.bytes_written)} written in {report.duration:.1f} s, "
        f"{human_bytes(report.bytes_fetched)} read from the repository",
        highlight=False,
    )


def export(
    point: str = typer.Argument(..., help="Restore point id (or a unique prefix)."),
    disk: str = typer.Argument(..., help="Disk name, as `vmkeep list --json` shows it."),
    output: Path = typer.Argument(..., help="Image file to write (must not exist)."),
    fmt: str = typer.Option(
        "raw", "--format", help="raw, qcow2 or vhd (dynamic VHD, for Hyper-V and XCP-ng)."
    ),
    remote: str | None = RemoteOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Write one disk of a restore point as a portable image, usable without vmkeep."""
    from vmkeep.operations.export import export_disk  # its disk writers: only when used

    repo = state.open_repository(remote)
    report = export_disk(repo, point, disk, fmt, output, RichProgress(not json_out))
    if json_out:
        print_json(report.to_json())
    else:
        console.print(
            f"exported {report.disk} of {report.restore_point} to {report.path} "
            f"({fmt}, {human_bytes(report.size)})",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command("backup")(backup)
    app.command("restore")(restore)
    app.command("export")(export)
