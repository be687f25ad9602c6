"""Repository commands: init, list, verify, gc, prune, forget, key."""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer

from vmkeep.errors import UsageError

from .context import state
from .output import (
    LARGE_LISTING,
    RichProgress,
    console,
    human_bytes,
    print_error,
    print_json,
    print_plain_table,
    shown,
    stdout,
    table,
)

if TYPE_CHECKING:
    from vmkeep.operations.retention import CombinedPolicy, PruneDecision, RetentionPolicy
    from vmkeep.repository.point_summary import PointSummary

# Each command imports the repository and operations it uses inside its function: every
# command module is imported at start-up to register its commands, and `vmkeep --help` must
# not pay for crypto, zstd or the operations (tests/test_startup_imports.py).

RemoteOpt = typer.Option(None, "--remote", "-r", help="Remote name, path or URL.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")
FormatOpt = typer.Option(
    None,
    "--format",
    help="Repository format: 3 (the default: blocks in pack objects, small deltas for "
    'scattered writes; docs/DATA-PATH.md "Format 3", retention locks included) or 1/2 (one '
    "object per chunk; 2 is the default for a --chunk-size other than 4M).",
)
BlockSizeOpt = typer.Option(
    None,
    "--block-size",
    help="Format 3: block size, 64K up to the chunk size (default 64K, or the chunk size "
    "when smaller).",
)
PackSizeOpt = typer.Option("16M", "--pack-size", help="Format 3: pack size, 1M to 128M.")


def init(
    location: str = typer.Argument(
        ...,
        help="Path or URL of the new repository "
        "(`vmkeep remote add` names it and creates it in one step).",
    ),
    encryption: str = typer.Option("aes-256-gcm", help="aes-256-gcm (default) or none."),
    chunk_size: str = typer.Option(
        "4MiB",
        "--chunk-size",
        help="64K, 128K, 256K, 512K, 1M, 2M or 4M (default). Smaller chunks store less for "
        "scattered writes, but make more objects and bigger indexes (docs/DATA-PATH.md). "
        "Fixed for the repository's life.",
    ),
    format_version: int | None = FormatOpt,
    block_size: str | None = BlockSizeOpt,
    pack_size: str = PackSizeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Create a repository (encrypted by default: you will be asked for a passphrase)."""
    from vmkeep.remotes.location import open_remote
    from vmkeep.repository.repository import Repository

    size = parse_chunk_size(chunk_size)
    repo = Repository.init(
        open_remote(location),
        encryption,
        lambda: state.passphrase(confirm=True),
        size,
        **packed_options(format_version, block_size, pack_size),
    )
    if json_out:
        print_json(
            {
                "location": repo.remote.url,
                "id": repo.config["id"],
                "encryption": encryption,
                "chunk_size": repo.chunk_size,
                "format": repo.config["version"],
            }
        )
    else:
        console.print(
            f"created repository {repo.config['id'][:8]} at {repo.remote.url} "
            f"(encryption: {encryption}, chunk size: {format_chunk_size(repo.chunk_size)}, "
            f"format {repo.config['version']})"
        )


def packed_options(
    format_version: int | None, block_size: str | None, pack_size: str
) -> dict[str, Any]:
    """Repository.init's format arguments from the CLI's options (block and pack size for
    format 3, asked for or the default; a --block-size asks for format 3)."""
    if format_version is not None and format_version != 3:
        return {"format_version": format_version}
    return {
        "format_version": 3 if block_size is not None else format_version,
        "block_size": None if block_size is None else parse_size(block_size, "--block-size"),
        "pack_size": parse_size(pack_size, "--pack-size"),
    }


def parse_size(text: str, option: str) -> int:
    """`128K`, `16M`, `16MiB` or bytes (the repository checks the range)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"invalid {option} {text[:40]!r} (e.g. 128K, 16M)")
    return int(match[1]) * _UNITS[match[2].lower()]


_SIZE = re.compile(r"(\d{1,12})\s*(|b|k|kib|m|mib)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}


def parse_chunk_size(text: str) -> int:
    """`256K`, `256KiB`, `1M`, `4MiB` or bytes; a power of two from 64 KiB to 4 MiB."""
    from vmkeep.repository.format import valid_chunk_size
    from vmkeep.repository.repository import CHUNK_SIZE_RULE

    match = _SIZE.fullmatch(text.strip())
    size = int(match[1]) * _UNITS[match[2].lower()] if match else None
    if size is None or not valid_chunk_size(size):
        raise UsageError(
            f"invalid --chunk-size {text[:40]!r}: {CHUNK_SIZE_RULE} (e.g. 256K, 1M, 4MiB)"
        )
    return size


def format_chunk_size(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def list_points(
    remote: str | None = RemoteOpt,
    vm: str | None = typer.Option(None, "--vm", help="Only this VM (name or uuid)."),
    json_out: bool = JsonOpt,
) -> None:
    """List the VMs and restore points in a repository."""
    from vmkeep.repository.point_cache import point_summaries

    repo = state.open_repository(remote)
    points, problems = point_summaries(repo, RichProgress(not json_out, unit_bytes=False))
    if vm:
        points = [p for p in points if vm in (p.vm_name, p.vm_uuid)]
    points.sort(key=lambda p: (p.vm_name, p.created))
    rows: list[dict[str, Any]] = [
        {
            "restore_point": p.id,
            "vm": p.vm_name,
            "vm_uuid": p.vm_uuid,
            "mode": p.mode,
            "created": p.created.isoformat(),
            "schedule": p.schedule,
            "disks": [d.name for d in p.disks],
            "size": p.size,
            "data_bytes": p.data_bytes,
            "new_bytes_written": p.stats.get("bytes_written"),
            "locked_until": (p.lock or {}).get("until"),
        }
        for p in points
    ]
    if json_out:
        print_json(
            {
                "chunk_size": repo.chunk_size,
                "format": repo.config["version"],
                "restore_points": rows,
                "unreadable": [p.__dict__ for p in problems],
            }
        )
        return
    columns = ["restore point", "vm", "created (UTC)", "mode", "schedule"]
    columns += ["disk size", "data", "new stored"]
    title = f"{repo.remote.url} ({format_chunk_size(repo.chunk_size)} chunks)"
    cells = [
        [
            r["restore_point"],
            r["vm"],
            str(r["created"])[:19],
            r["mode"],
            r["schedule"],
            human_bytes(r["size"]),
            human_bytes(r["data_bytes"]),
            human_bytes(r["new_bytes_written"]),
        ]
        for r in rows
    ]
    if len(cells) > LARGE_LISTING:
        print_plain_table(columns, cells, title)
    else:
        listing = table(*columns, title=title)
        for cell in cells:
            listing.add_row(*(shown(v) for v in cell))
        stdout.print(listing)
    for p in problems:
        console.print(f"[red]unreadable restore point[/] {shown(p.point_id)}: {shown(p.error)}")


def verify_cmd(
    point: str | None = typer.Argument(None, help="A restore point; default: all."),
    remote: str | None = RemoteOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Re-read every chunk and check its authentication and hash. Exit 3 on corruption."""
    from vmkeep.repository.verify import verify

    repo = state.open_repository(remote)
    ids = [repo.resolve_point(point)] if point is not None else None
    report = verify(repo, ids, RichProgress(not json_out, unit_bytes=False))
    if json_out:
        print_json(report.to_json())
    else:
        for m in report.corrupt_manifests:
            console.print(f"[red]corrupt restore point[/] {shown(m.point_id)}: {shown(m.error)}")
        for m in report.corrupt_index:
            console.print(f"[red]corrupt index object[/] {shown(m.point_id)}: {shown(m.error)}")
        for c in report.corrupt_chunks:
            console.print(
                f"[red]corrupt chunk[/] {c.chunk_id[:16]}: {c.error}; affects {', '.join(c.points)}"
            )
        if report.corrupt_chunks_unnamed:
            console.print(
                f"[red]{report.corrupt_chunks_unnamed} more corrupt chunks[/] (not listed: only "
                f"the {len(report.corrupt_chunks)} with the lowest IDs are named)"
            )
        console.print(
            f"checked {report.points_checked} restore points, {report.chunks_checked} "
            f"chunks ({human_bytes(report.bytes_checked)}): "
            + ("[green]no errors[/]" if report.ok else "[red]CORRUPTION FOUND[/]")
        )
    if not report.ok:
        print_error(
            f"corruption found: {report.corrupt_chunk_count} chunks, "
            f"{len(report.corrupt_manifests)} restore points unreadable"
            + (f", {len(report.corrupt_index)} index objects" if report.corrupt_index else "")
        )
        raise typer.Exit(3)


def gc(
    remote: str | None = RemoteOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only count what would be freed."),
    json_out: bool = JsonOpt,
) -> None:
    """Delete chunks no restore point references (refuses while a backup runs)."""
    from vmkeep.repository.gc import collect_garbage

    repo = state.open_repository(remote)
    report = collect_garbage(repo, RichProgress(not json_out, unit_bytes=False), dry_run)
    if json_out:
        print_json(report.to_json())
    else:
        verb = "would free" if dry_run else "freed"
        console.print(
            f"{report.points} restore points reference {report.chunks_kept} chunks; "
            f"{verb} {report.chunks_deleted} chunks ({human_bytes(report.bytes_freed)})"
        )
        if report.packs is not None:
            would = "would delete" if dry_run else "deleted"
            console.print(
                f"packs: {would} {report.packs.packs_deleted}, of which "
                f"{report.packs.packs_repacked} repacked (live blobs copied into "
                f"{report.packs.packs_written} new packs)"
                + (
                    f"; {report.packs.packs_locked} kept as they are under a retention lock"
                    if report.packs.packs_locked
                    else ""
                )
            )
        if report.locked.count:
            console.print(
                f"[yellow]immutable:[/] {report.locked.describe('unreferenced chunks')}; "
                "a later gc frees them",
                highlight=False,
            )


def prune(
    remote: str | None = RemoteOpt,
    keep_last: int = typer.Option(0, help="Keep the N newest restore points."),
    keep_daily: int = typer.Option(0, help="Keep the newest point of each of the last N days."),
    keep_weekly: int = typer.Option(0, help="... of each of the last N ISO weeks."),
    keep_monthly: int = typer.Option(0, help="... of each of the last N months."),
    keep_yearly: int = typer.Option(0, help="... of each of the last N years."),
    timezone: str = typer.Option("UTC", help="Time zone of the day/week/month boundaries."),
    keep_schedule: list[str] = typer.Option(
        [],
        "--keep-schedule",
        metavar="NAME=N",
        help="Schedule NAME keeps its N newest points, and the --keep-daily/... rules "
        "then run over all of a VM's points of the named schedules together (repeatable; "
        "other schedules are untouched; docs/RETENTION.md §8).",
    ),
    vm: str | None = typer.Option(None, "--vm", help="Only this VM (name or uuid)."),
    schedule: str | None = typer.Option(None, "--schedule", help="Only this schedule tag."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would go; delete nothing."),
    json_out: bool = JsonOpt,
) -> None:
    """Forget restore points by retention policy, per VM and schedule (run gc to free space)."""
    from vmkeep.operations.prune import apply_prune
    from vmkeep.operations.retention import (
        CombinedPolicy,
        PointRef,
        RetentionPolicy,
        combined_plan,
        prune_plan,
    )

    long_term = (keep_daily, keep_weekly, keep_monthly, keep_yearly)
    policy: RetentionPolicy | CombinedPolicy
    if keep_schedule:
        if keep_last or schedule is not None:
            raise UsageError(
                "--keep-schedule gives each schedule its own keep-last: "
                "it does not combine with --keep-last or --schedule"
            )
        policy = CombinedPolicy(parse_keep_schedule(keep_schedule), *long_term, timezone)
    else:
        policy = RetentionPolicy(keep_last, *long_term, timezone)
    if policy.is_empty():
        raise UsageError(
            "no retention given: use --keep-last/--keep-daily/... "
            "(an empty policy would delete everything)"
        )
    from vmkeep.repository.point_cache import point_summaries

    repo = state.open_repository(remote)
    summaries, _ = point_summaries(repo, RichProgress(not json_out, unit_bytes=False))
    chosen = [
        m
        for m in summaries
        if (vm is None or vm in (m.vm_name, m.vm_uuid))
        and (schedule is None or m.schedule == schedule)
    ]
    names = {m.id: m.vm_name for m in chosen}
    points = [PointRef(m.id, m.vm_uuid, m.schedule, m.created, m.job) for m in chosen]
    plan: list[PruneDecision]
    if isinstance(policy, CombinedPolicy):
        plan = combined_plan(points, policy)
    else:
        if any(long_term):
            warn_several_schedules(chosen)
        plan = prune_plan(points, policy)
    result = apply_prune(repo, plan, dry_run, manifest_lock_ends(chosen))
    removed = result.removed
    if json_out:
        print_json(
            {
                "dry_run": dry_run,
                "decisions": [
                    {
                        "restore_point": d.point.id,
                        "vm": names[d.point.id],
                        "schedule": d.point.schedule,
                        "job": d.point.job,
                        "created": d.point.time.isoformat(),
                        "keep": d.keep,
                        "reasons": d.reasons,
                    }
                    for d in plan
                ],
                "removed": removed,
                "locked": [
                    {"restore_point": p, "until": u.isoformat() if u else None}
                    for p, u in result.locked.items()
                ],
            }
        )
        return
    cells = []
    for d in plan:
        action = "keep" if d.keep else ("would remove" if dry_run else "removed")
        if d.point.id in result.locked:
            action = "locked, would be kept" if dry_run else "locked, kept"
        cells.append(
            [
                d.point.id,
                names[d.point.id],
                d.point.schedule,
                d.point.time.isoformat()[:19],
                action,
                ", ".join(d.reasons),
            ]
        )
    columns = ["restore point", "vm", "schedule", "created (UTC)", "action", "why"]
    if len(cells) > LARGE_LISTING:
        print_plain_table(columns, cells)
    else:
        listing = table(*columns)
        for cell in cells:
            listing.add_row(*(shown(v) for v in cell))
        stdout.print(listing)
    report_locked_points(result.locked)


def parse_keep_schedule(values: list[str]) -> dict[str, int]:
    """`--keep-schedule NAME=N` values as {NAME: N}; `=N` names the points without a schedule."""
    counts: dict[str, int] = {}
    for value in values:
        match = re.fullmatch(r"(.*)=([0-9]+)", value)
        if match is None:
            raise UsageError(
                f"--keep-schedule {value!r}: expected NAME=N with N a whole number, e.g. hourly=24"
            )
        name = match[1]
        if name in counts:
            raise UsageError(f"--keep-schedule: schedule {name!r} is given twice")
        counts[name] = int(match[2])
    return counts


def manifest_lock_ends(points: list[PointSummary]) -> dict[str, datetime]:
    """What each manifest says about its own lock (for --dry-run)."""
    return {p.id: until for p in points if (until := p.lock_until()) is not None}


def report_locked_points(locked: dict[str, datetime | None]) -> None:
    """Prune does not fail on locked points: it keeps them and says until when."""
    if not locked:
        return
    from vmkeep.repository.retention_lock import LockedObjects

    summary = LockedObjects()
    for until in locked.values():
        summary.add(until)
    console.print(
        f"[yellow]immutable:[/] {summary.describe('restore points')}: "
        "prune removes them once unlocked",
        highlight=False,
    )


def warn_several_schedules(manifests: list[PointSummary]) -> None:
    """SPEC §3: long-term retention over several schedules of one VM duplicates history."""
    tags: dict[str, set[str]] = {}
    for m in manifests:
        tags.setdefault(m.vm_name, set()).add(m.schedule)
    for vm_name, schedules in sorted(tags.items()):
        if len(schedules) > 1:
            console.print(
                f"[yellow]warning:[/] VM {vm_name} has restore points of {len(schedules)} "
                f"schedules ({', '.join(sorted(map(repr, schedules)))}): long-term retention "
                "applies to each separately and keeps duplicate history; --keep-schedule "
                "NAME=N combines them (docs/RETENTION.md)",
                highlight=False,
            )


def forget(
    point: str = typer.Argument(..., help="Restore point to delete."),
    remote: str | None = RemoteOpt,
) -> None:
    """Delete one restore point (its chunks go at the next gc)."""
    repo = state.open_repository(remote)
    point_id = repo.resolve_point(point)
    repo.delete_manifest(point_id)
    console.print(f"forgot {point_id}")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("list")(list_points)
    app.command("verify")(verify_cmd)
    app.command("gc")(gc)
    app.command("prune")(prune)
    app.command("forget")(forget)
