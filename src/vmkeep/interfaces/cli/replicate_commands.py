"""`vmkeep replicate`: copy a libvirt domain straight to a storage pool (no repository)."""

from __future__ import annotations

import typer

from .data_commands import NbdHostOpt, NbdPortOpt, NbdTlsCertsOpt, NbdTlsOpt, nbd_export
from .output import RichProgress, console, human_bytes, print_json, stdout, table
from .repo_commands import JsonOpt


def replicate_command(
    domain: str = typer.Argument(..., help="The source domain: name or uuid."),
    to: str = typer.Option(..., "--to", help="Storage pool (type dir) of the replica's volumes."),
    mode: str = typer.Option(
        "incremental",
        "--mode",
        help="full: a new dated replica per run; incremental: one replica updated in place.",
    ),
    keep: int = typer.Option(
        3, "--keep", help="full: replicas kept; incremental: replica snapshots kept (1-9)."
    ),
    uri: str | None = typer.Option(None, "--uri", help="Source libvirt URI (qemu:///system)."),
    target_uri: str | None = typer.Option(
        None, "--target-uri", help="libvirt URI of the replica (default: the source's)."
    ),
    nbd_host: str | None = NbdHostOpt,
    nbd_port: int = NbdPortOpt,
    nbd_tls: bool = NbdTlsOpt,
    nbd_tls_certs: str = NbdTlsCertsOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Replicate a libvirt domain to a powered-off replica domain; the replica is never
    started by vmkeep. A source on another host (remote --uri) is read through its backup
    job's NBD export on TCP (--nbd-host) when it runs, over ssh when it is shut off."""
    from vmkeep.operations.replication import ReplicateOptions, replicate  # needs libvirt

    options = ReplicateOptions(
        domain=domain,
        pool=to,
        mode=mode,
        keep=keep,
        uri=uri or "qemu:///system",
        target_uri=target_uri or "",
        nbd=nbd_export(nbd_host, nbd_port, nbd_tls, nbd_tls_certs),
    )
    report = replicate(options, RichProgress(not json_out))
    if json_out:
        print_json(report.to_json())
        return
    s = report.stats
    console.print(
        f"{report.mode} replication of {report.source} to [bold]{report.replica}[/]"
        f"{' (new)' if report.fresh else ''}: read {human_bytes(s.bytes_read)}, wrote "
        f"{human_bytes(s.bytes_written)} (+{human_bytes(s.bytes_zeroed)} zeroed) in "
        f"{report.duration:.1f} s"
        + (
            f"; snapshot {report.snapshot} ({len(report.snapshots)} kept)"
            if report.snapshot
            else ""
        )
        + (f"; deleted {', '.join(report.deleted)}" if report.deleted else ""),
        highlight=False,
    )


def replicas_command(
    domain: str = typer.Argument(..., help="The source domain (name or uuid; may be gone)."),
    uri: str | None = typer.Option(None, "--uri", help="Source libvirt URI (qemu:///system)."),
    target_uri: str | None = typer.Option(
        None, "--target-uri", help="libvirt URI of the replicas (default: the source's)."
    ),
    json_out: bool = JsonOpt,
) -> None:
    """List a domain's replicas (full and incremental) with their rollback snapshots."""
    from vmkeep.operations.replication.listing import list_replicas  # needs libvirt

    rows = list_replicas(domain, uri or "qemu:///system", target_uri or "")
    if json_out:
        print_json(rows)
        return
    listing = table("name", "kind", "state", "written (UTC)", "snapshots")
    for r in rows:
        listing.add_row(
            r["name"],
            r["kind"] + (" (interrupted)" if r["interrupted"] else ""),
            r["state"],
            r["created"][:19],
            ", ".join(r["snapshots"]) or "-",
        )
    stdout.print(listing)


def register(app: typer.Typer) -> None:
    app.command("replicate")(replicate_command)
    app.command("replicas")(replicas_command)
