"""`vmkeep files ls|get`: browse and get files of any restore point without restoring it
(docs/FILE-RESTORE.md). The operations (and dissect) are imported only when a command runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from vmkeep.errors import ImageError, UsageError, VmkeepError

from .context import state
from .output import (
    RichProgress,
    console,
    human_bytes,
    plain,
    print_error,
    print_json,
    shown,
    stdout,
    table,
)
from .repo_commands import JsonOpt, RemoteOpt

if TYPE_CHECKING:
    from vmkeep.operations.filerestore.model import FileSystem
    from vmkeep.operations.filerestore.session import PointFiles
    from vmkeep.operations.point_disk import FetchStats

files_app = typer.Typer(
    help="Browse and get files of a restore point, read in place (no restore, no root).",
    no_args_is_help=True,
)


@files_app.command("ls")
def ls(
    point: str = typer.Argument(..., help="Restore point id (or a unique prefix)."),
    where: str | None = typer.Argument(
        None,
        metavar="[DISK[:N|:VG/LV][/PATH]]",
        help="Nothing: the disks, partitions and volumes. DISK:N/PATH or DISK:VG/LV/PATH: a "
        "directory's entries (or one entry).",
    ),
    remote: str | None = RemoteOpt,
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many entries first."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Show at most this many."),
    json_out: bool = JsonOpt,
) -> None:
    """List the volumes of a restore point, or the entries of a directory in one of them.
    Entries are streamed: a huge directory is printed as it is read (page with --offset and
    --limit)."""
    from vmkeep.operations.filerestore.session import PointFiles, parse_address

    address = parse_address(where)
    with PointFiles(state.open_repository(remote), point) as files:
        if address.volume is None:
            _show_volumes(files, json_out)
        else:
            fs = files.filesystem(address.volume)
            _show_entries(fs, address.volume, address.path, offset, limit, json_out)


def _show_volumes(files: PointFiles, json_out: bool) -> None:
    infos = files.volumes()
    warnings = files.layout.warnings
    if json_out:
        print_json({"volumes": [i.to_json() for i in infos], "warnings": warnings})
        return
    rows = table("ADDRESS", "KIND", "TYPE", "SIZE", "FILE SYSTEM", "LABEL", "NOTE")
    for info in infos:
        v = info.volume
        note = (
            v.error or info.note or (f"VG spans {', '.join(v.disks)}" if len(v.disks) > 1 else "")
        )
        rows.add_row(
            shown(v.address),
            v.kind,
            shown(v.type or "-"),
            human_bytes(v.size),
            shown(info.filesystem or "-"),
            shown(info.label),
            shown(note or (v.name and f"name {v.name}") or ""),
        )
    stdout.print(rows)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {shown(warning)}")


def _show_entries(
    fs: FileSystem, volume: str, path: bytes, offset: int, limit: int | None, json_out: bool
) -> None:
    from vmkeep.operations.filerestore.listing import entries, entry_json, entry_line, show_name

    _warn_dirty(fs)
    rows = entries(fs, path, offset, limit)
    out = sys.stdout
    if json_out:
        head = {
            "volume": volume,
            "path": show_name(path),
            "filesystem": fs.info.type_name,
            "label": fs.info.label,
            "dirty": fs.info.dirty,
        }
        out.write(json.dumps(head)[:-1] + ', "entries": [')
        error: VmkeepError | None = None
        try:
            for i, entry in enumerate(rows):
                out.write(("," if i else "") + "\n  " + json.dumps(entry_json(entry)))
        except VmkeepError as exc:  # mid-stream: stdout stays one JSON document
            error = exc
        tail = {"warnings": fs.info.warnings, "error": error.message if error else None}
        out.write("\n], " + json.dumps(tail)[1:] + "\n")
        if error is not None:
            print_error(error.message)
            raise typer.Exit(error.exit_code)
        return
    for entry in rows:
        out.write(plain(entry_line(entry)) + "\n")
    for warning in fs.info.warnings:
        console.print(f"[yellow]warning:[/] {shown(warning)}")


def _warn_dirty(fs: FileSystem) -> None:
    if fs.info.dirty:
        for warning in fs.info.warnings[:1]:
            console.print(f"[yellow]warning:[/] {shown(warning)}")


@files_app.command("get")
def get(
    point: str = typer.Argument(..., help="Restore point id (or a unique prefix)."),
    volume: str = typer.Argument(..., metavar="DISK[:N|:VG/LV]", help="The volume to read."),
    paths: list[str] = typer.Argument(..., metavar="PATH...", help="Files or directories."),
    to: Path | None = typer.Option(None, "--to", help="Write into this directory."),
    tar: str | None = typer.Option(None, "--tar", help="Write a PAX tar file (- for stdout)."),
    zip_file: str | None = typer.Option(None, "--zip", help="Write a zip file."),
    no_owners: bool = typer.Option(
        False, "--no-owners", help="With --to as root: do not restore owners."
    ),
    remote: str | None = RemoteOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Get files and directories (recursively, streamed) out of a restore point. Never writes
    outside the target, never replaces an existing file."""
    from vmkeep.operations.filerestore.archive import create_new, write_tar, write_zip
    from vmkeep.operations.filerestore.extract import DirTarget, GetOptions, total_bytes
    from vmkeep.operations.filerestore.session import PointFiles, parse_address

    if sum(x is not None for x in (to, tar, zip_file)) != 1:
        raise UsageError("give exactly one of --to DIR, --tar FILE or --zip FILE")
    address = parse_address(volume)
    if address.volume is None or address.path != b"/":
        raise UsageError(f"{volume!r}: name the volume alone (DISK:N), then the paths")
    wanted = [os.fsencode(p) for p in paths]
    progress = RichProgress(not json_out and tar != "-")
    with PointFiles(state.open_repository(remote), point) as files:
        fs = files.filesystem(address.volume)
        _warn_dirty(fs)
        progress.start("get", total_bytes(fs, wanted))
        try:
            if to is not None:
                result = DirTarget(
                    str(to), progress, GetOptions(owners=not no_owners and os.geteuid() == 0)
                ).get(fs, wanted)
            else:
                archive = tar or zip_file or ""
                with create_new(archive) as out:
                    write = write_tar if tar is not None else write_zip
                    try:
                        result = write(fs, wanted, out, progress)
                    except BaseException:
                        if archive != "-":  # no half archive that looks complete
                            os.unlink(archive)
                        raise
        finally:
            progress.finish()
        fetched = files.fetched
    warnings = [*fs.info.warnings[1 if fs.info.dirty else 0 :], *result.warnings]
    summary: dict[str, Any] = {
        "files": result.files,
        "dirs": result.dirs,
        "links": result.links,
        "bytes": result.bytes,
        "skipped": result.skipped,
        "dirty": fs.info.dirty,
        "fetched_chunks": fetched.chunks,
        "fetched_blocks": fetched.blocks,
        "fetched_bytes": fetched.bytes,
        "warnings": warnings,
    }
    if json_out and tar == "-":  # stdout is the archive: the summary goes to stderr
        console.print_json(json.dumps(summary))
    elif json_out:
        print_json(summary)
    else:
        for warning in warnings:
            console.print(f"[yellow]warning:[/] {shown(warning)}")
        (console if tar == "-" else stdout).print(
            f"got {result.files} files, {result.dirs} directories, {result.links} links "
            f"({human_bytes(result.bytes)}); fetched {fetched_what(fetched)}",
            highlight=False,
        )
    if result.skipped:
        raise ImageError(
            f"{result.skipped} entries could not be read from the image (see warnings)"
        )


def fetched_what(fetched: FetchStats) -> str:
    """ "3 chunks and 12 blocks (14.0 MiB)": what file restore read from the repository."""
    parts = [f"{fetched.chunks} chunks"] + ([f"{fetched.blocks} blocks"] if fetched.blocks else [])
    return f"{' and '.join(parts)} ({human_bytes(fetched.bytes)})"


def register(app: typer.Typer) -> None:
    app.add_typer(files_app, name="files")
