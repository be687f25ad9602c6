"""`vmkeep config backup|restore|list|show`: vmkeep's own configuration to and from a
repository (docs/METADATA-BACKUP.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from vmkeep.errors import UsageError

from .context import state
from .output import console, print_json, shown, stdout, table
from .passphrase import PassphraseSource
from .repo_commands import JsonOpt

config_app = typer.Typer(
    help="Back up and restore vmkeep's own configuration (remotes, jobs, schedules, secrets) "
    "and the hypervisors' metadata.",
    no_args_is_help=True,
)

MetaPassOpt = typer.Option(
    None,
    "--metadata-passphrase-file",
    help="Wrap the secrets with the passphrase in this file (default: the repository's "
    "passphrase: --passphrase-file, VMKEEP_PASSPHRASE or the prompt).",
)
PointOpt = typer.Option(
    None, "--point", help="Metadata point id or unique prefix (default: newest)."
)


def metadata_passphrase(path: Path | None) -> PassphraseSource:
    return PassphraseSource(path) if path is not None else state.passphrase


@config_app.command("backup")
def backup(
    remote: str = typer.Argument(..., help="Remote name, path or URL."),
    keep: int = typer.Option(30, "--keep", help="Keep the last N metadata points (N >= 1)."),
    libvirt_uri: list[str] = typer.Option(
        [], "--libvirt-uri", help="Also store this libvirt's domain, network and pool XML."
    ),
    passphrase_file: Path | None = MetaPassOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Store remotes, jobs, schedules and secrets (re-wrapped by the passphrase) in REMOTE."""
    from vmkeep.engine.metadata import gather_config
    from vmkeep.engine.state import StateDB
    from vmkeep.operations.hypervisor_metadata import collect_libvirt
    from vmkeep.operations.metadata_backup import backup_metadata
    from vmkeep.operations.retention import RetentionPolicy

    if keep < 1:
        raise UsageError("--keep must be 1 or more")
    repo = state.open_repository(remote)
    snapshot = gather_config(StateDB.open())
    hypervisors = [collect_libvirt(uri) for uri in libvirt_uri]
    secret = metadata_passphrase(passphrase_file)()
    result = backup_metadata(repo, snapshot, secret, hypervisors, RetentionPolicy(keep_last=keep))
    if json_out:
        print_json(result.to_json())
        return
    objects = sum(len(h.objects) for h in hypervisors)
    console.print(
        f"metadata point [bold]{result.point_id}[/]: {len(snapshot.remotes)} remotes, "
        f"{len(snapshot.jobs)} jobs, {len(snapshot.secrets)} secrets, "
        f"{objects} libvirt definitions; {len(result.pruned)} old points removed"
    )


@config_app.command("restore")
def restore(
    remote: str = typer.Argument(
        ..., help="Path or URL of the repository (names do not exist yet)."
    ),
    point: str | None = PointOpt,
    force: bool = typer.Option(False, "--force", help="Replace a data directory's configuration."),
    passphrase_file: Path | None = MetaPassOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Bring back every remote, job, schedule and secret into this data directory."""
    from vmkeep.engine.metadata import apply_config, refuse_configured
    from vmkeep.engine.state import StateDB, data_dir
    from vmkeep.operations.metadata_backup import read_metadata
    from vmkeep.repository.metadata_objects import resolve_metadata

    if not force:
        refuse_configured(data_dir())  # before any passphrase is asked
    repo = state.open_repository(remote)
    document = read_metadata(repo, resolve_metadata(repo, point))
    snapshot = document.snapshot(metadata_passphrase(passphrase_file)())
    db = StateDB.open()
    apply_config(db, snapshot, force=force)
    info = document.point
    if json_out:
        print_json({"restored": info.to_json(), "data_dir": str(db.directory)})
        return
    console.print(
        f"restored metadata point [bold]{info.id}[/] into {shown(db.directory)}: "
        f"{len(info.remotes)} remotes, {len(info.jobs)} jobs, {info.schedules} schedules, "
        f"{info.secrets} secrets"
    )


@config_app.command("list")
def list_points(
    remote: str = typer.Argument(..., help="Remote name, path or URL."),
    json_out: bool = JsonOpt,
) -> None:
    """List the metadata points in a repository."""
    from vmkeep.operations.metadata_backup import list_metadata

    repo = state.open_repository(remote)
    points, problems = list_metadata(repo)
    if json_out:
        print_json(
            {
                "points": [p.to_json() for p in points],
                "unreadable": [{"id": i, "error": e} for i, e in problems],
            }
        )
        return
    listing = table("metadata point", "created", "host", "remotes", "jobs", "schedules", "secrets")
    for p in points:
        listing.add_row(
            p.id,
            p.created,
            shown(p.host),
            shown(", ".join(p.remotes)),
            shown(", ".join(p.jobs)),
            str(p.schedules),
            str(p.secrets),
        )
    stdout.print(listing)
    for point_id, error in problems:
        console.print(f"[red]unreadable[/] {shown(point_id)}: {shown(error)}")


@config_app.command("show")
def show(
    remote: str = typer.Argument(..., help="Remote name, path or URL."),
    point: str | None = PointOpt,
    libvirt: bool = typer.Option(False, "--libvirt", help="Print the stored libvirt XML."),
    json_out: bool = JsonOpt,
) -> None:
    """What a metadata point holds (never the secrets' values)."""
    from vmkeep.operations.metadata_backup import read_metadata
    from vmkeep.repository.metadata_objects import resolve_metadata

    repo = state.open_repository(remote)
    document = read_metadata(repo, resolve_metadata(repo, point))
    if json_out:
        data = {
            "point": document.point.to_json(),
            "remotes": document.remotes,
            "jobs": document.jobs,
            "hypervisors": [h.to_json() if libvirt else h.counts() for h in document.hypervisors],
        }
        print_json(data)
        return
    if not libvirt:
        info = document.point
        stdout.print(f"metadata point {info.id} from {shown(info.host)} at {info.created}")
        stdout.print(f"remotes: {shown(', '.join(info.remotes)) or '-'}")
        stdout.print(f"jobs: {shown(', '.join(info.jobs)) or '-'} ({info.schedules} schedules)")
        stdout.print(f"secrets: {info.secrets} (sealed by the metadata passphrase)")
        for h in document.hypervisors:
            counts = ", ".join(f"{n} {k}s" for k, n in h.counts().items())
            stdout.print(f"libvirt {shown(h.uri)}: {counts}")
        return
    if not document.hypervisors:
        raise UsageError(f"metadata point {document.point.id} holds no libvirt metadata")
    for h in document.hypervisors:
        for obj in h.objects:  # raw XML on stdout, ready for `virsh define` by hand
            print(f"<!-- {obj.kind} {obj.name} {obj.uuid} from {h.uri} -->")
            print(obj.xml.rstrip("\n"))
