"""`vmkeep mirror`: copy restore points from one repository to another (docs/MIRROR.md)."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vmkeep.errors import UsageError

from .context import CliState, state
from .output import (
    RichProgress,
    console,
    human_bytes,
    print_json,
    shown,
    stdout,
    table,
)
from .passphrase import PassphraseSource
from .repo_commands import JsonOpt

if TYPE_CHECKING:
    from vmkeep.operations.mirror import MirrorReport
    from vmkeep.repository.repository import Repository

TARGET_ENV = "VMKEEP_TARGET_PASSPHRASE"
SourcePassphraseOpt = typer.Option(
    None, "--source-passphrase-file", help="The source's passphrase (else as every command)."
)
TargetPassphraseOpt = typer.Option(
    None,
    "--target-passphrase-file",
    help=f"The target's passphrase (else {TARGET_ENV}, else VMKEEP_PASSPHRASE, else asked).",
)


class TargetPassphrase(PassphraseSource):
    """The target's passphrase: its file, VMKEEP_TARGET_PASSPHRASE, VMKEEP_PASSPHRASE (one
    passphrase for both), or a prompt that says which repository it is for."""

    def origin(self) -> str:
        if self.file is None and TARGET_ENV in os.environ:
            return TARGET_ENV
        return super().origin()

    def _read(self, confirm: bool) -> bytes:
        if self.file is None and TARGET_ENV in os.environ:
            return os.fsencode(os.environ[TARGET_ENV])
        if self.file is None and "VMKEEP_PASSPHRASE" not in os.environ:
            try:
                return os.fsencode(getpass.getpass("Target repository passphrase: "))
            except EOFError:
                raise UsageError("no target passphrase: the terminal closed") from None
        return super()._read(confirm)


def open_pair(
    source_ref: str,
    target_ref: str,
    source_file: Path | None,
    target_file: Path | None,
    lock_days: int | None = None,
) -> tuple[Repository, Repository]:
    """Both repositories, each with its own passphrase; the same location twice is refused
    before any passphrase is asked. What is copied to the target is locked as a backup to it
    would be: the target remote's lock, or `lock_days` (0: none)."""
    from vmkeep.remotes.object_lock import apply_lock_policy

    if state.registry.resolve(source_ref) == state.registry.resolve(target_ref):
        raise UsageError(
            f"target {target_ref!r} is the source itself: refusing to mirror onto its own source"
        )
    source_pass = PassphraseSource(source_file) if source_file else state.passphrase
    source = CliState(source_pass, state.registry).open_repository(source_ref)
    target = CliState(TargetPassphrase(target_file), state.registry).open_repository(target_ref)
    apply_lock_policy(target.remote, state.lock_policy(target_ref, lock_days))
    return source, target


def mirror_command(
    source: str = typer.Argument(..., help="Source remote: name, path or URL."),
    target: str = typer.Argument(..., help="Target remote: name, path or URL."),
    mode: str = typer.Option(
        "incremental",
        "--mode",
        help="incremental: only points the target lacks; full: every selected point "
        "(restores chunks missing from the target for points it already holds).",
    ),
    vm: list[str] = typer.Option(
        [], "--vm", help="Only VMs whose name matches this glob, or this uuid (repeatable)."
    ),
    tag: list[str] = typer.Option(
        [], "--tag", help="Only restore points carrying this tag (repeatable: any of them)."
    ),
    verified_only: bool = typer.Option(
        False,
        "--verified-only",
        help="Read back and verify every chunk of a point in the source, even the ones the "
        "target already holds; a point that does not verify is not mirrored.",
    ),
    keep_last: int = typer.Option(0, help="Target retention: keep the N newest points."),
    keep_daily: int = typer.Option(0, help="... the newest point of each of the last N days."),
    keep_weekly: int = typer.Option(0, help="... of each of the last N ISO weeks."),
    keep_monthly: int = typer.Option(0, help="... of each of the last N months."),
    keep_yearly: int = typer.Option(0, help="... of each of the last N years."),
    timezone: str = typer.Option("UTC", help="Time zone of the retention's day boundaries."),
    compression_level: int = typer.Option(1, "--compression-level", help="zstd level, 0 = off."),
    lock_days: int | None = typer.Option(
        None,
        "--lock-days",
        help="Lock the copied points N days on the target (0: none); default: the target's.",
    ),
    source_passphrase_file: Path | None = SourcePassphraseOpt,
    target_passphrase_file: Path | None = TargetPassphraseOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Copy restore points to another repository, re-encrypted with its key; chunks it
    already holds are not uploaded. Exits 1 when any point failed (the others are copied)."""
    # The operation is imported when it runs, not at every start-up of the CLI.
    from vmkeep.operations.mirror import MirrorOptions, mirror
    from vmkeep.operations.retention import RetentionPolicy

    policy = RetentionPolicy(
        keep_last, keep_daily, keep_weekly, keep_monthly, keep_yearly, timezone
    )
    if not 0 <= compression_level <= 22:
        raise UsageError("--compression-level must be between 0 (off) and 22")
    options = MirrorOptions(
        mode=mode,
        vms=list(vm),
        tags=list(tag),
        verified_only=verified_only,
        retention=None if policy.is_empty() else policy,
        compression_level=compression_level,
    )
    if mode not in ("full", "incremental"):
        raise UsageError(f"unknown --mode {mode!r}: choose full or incremental")
    source_repo, target_repo = open_pair(
        source, target, source_passphrase_file, target_passphrase_file, lock_days
    )
    report = mirror(source_repo, target_repo, options, RichProgress(not json_out))
    if json_out:
        print_json(report.to_json())
    else:
        show_report(report)
    if report.failed:
        raise typer.Exit(1)


def migrate_command(
    source: str = typer.Argument(..., help="Repository to migrate (format 1 or 2)."),
    target: str = typer.Argument(
        ..., help="A format 3 repository of the same chunk size (`vmkeep init --format 3`)."
    ),
    source_passphrase_file: Path | None = SourcePassphraseOpt,
    target_passphrase_file: Path | None = TargetPassphraseOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Copy every restore point of a repository into a format 3 (packs) repository: a full
    mirror (docs/MIRROR.md) whose target must be format 3. Running it again copies only what
    is missing; the source is not changed."""
    from vmkeep.operations.mirror import MirrorOptions, mirror

    source_repo, target_repo = open_pair(
        source, target, source_passphrase_file, target_passphrase_file
    )
    check_migration(source_repo, target_repo)
    report = mirror(
        source_repo, target_repo, MirrorOptions(mode="full"), RichProgress(not json_out)
    )
    if json_out:
        print_json(report.to_json())
    else:
        show_report(report)
    if report.failed:
        raise typer.Exit(1)


def check_migration(source: Repository, target: Repository) -> None:
    """The target of `migrate` is format 3 with the source's chunk size (the manifests'
    indexes keep their chunk boundaries, only the chunk IDs are translated)."""
    size = source.chunk_size
    make = f"`vmkeep init TARGET --format 3 --chunk-size {size >> 10}K`"
    if target.packed is None:
        raise UsageError(
            f"migrate writes into a format 3 repository; {target.remote.url} is format "
            f"{target.config['version']}: create the target with {make}"
        )
    if target.chunk_size != size:
        raise UsageError(
            f"the target's chunk size {target.chunk_size} differs from the source's {size}: "
            f"migrate needs one chunk size; create the target with {make}"
        )


def show_report(report: MirrorReport) -> None:
    from vmkeep.operations.mirror import FAILED

    listing = table(
        "restore point", "vm", "result", "uploaded", "present", "fetched", "plaintext", "reason"
    )
    for p in report.points:
        listing.add_row(
            p.point_id,
            shown(p.vm),
            f"[red]{p.status}[/]" if p.status == FAILED else p.status,
            f"{p.chunks_uploaded} ({human_bytes(p.bytes_uploaded)})",
            str(p.chunks_present),
            human_bytes(p.bytes_fetched),
            human_bytes(p.bytes_plaintext),
            shown(p.reason),
        )
    stdout.print(listing)
    t = report.totals()
    console.print(
        f"mirrored {t['copied']} point(s) to {shown(report.target)} ({t['present']} already "
        f"there, {t['failed']} failed"
        + (f", {t['skipped_retention']} left out by retention" if t["skipped_retention"] else "")
        + f"): fetched {human_bytes(t['bytes_fetched'])} from the source "
        f"({human_bytes(t['bytes_plaintext'])} of plaintext, zeros included), uploaded "
        f"{t['chunks_uploaded']} chunk(s) "
        f"({human_bytes(t['bytes_uploaded'])}), {t['chunks_present']} already present, in "
        f"{report.duration:.1f} s"
        + (f"; pruned {len(report.pruned)} point(s) on the target" if report.pruned else ""),
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("mirror")(mirror_command)
    app.command("migrate")(migrate_command)
