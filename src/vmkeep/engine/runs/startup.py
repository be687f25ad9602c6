"""Start-up recovery: runs left unfinished by a dead process become `interrupted`, and the
repository locks such processes left behind are removed (docs/RUNS.md §6)."""

from __future__ import annotations

import logging

from vmkeep.errors import VmkeepError

from .context import EngineContext

log = logging.getLogger(__name__)


def recover(ctx: EngineContext, stale_after: float = 60) -> list[int]:
    """Mark dead runs interrupted (Ledger.mark_interrupted) and, on every known remote, remove
    the locks whose holders are gone (a lock of this host whose pid is dead is stale at once,
    FORMAT §6). Best effort: a remote that cannot be reached is logged and skipped."""
    marked = ctx.ledger.mark_interrupted(stale_after)
    for run_id in marked:
        log.warning("run %s was interrupted (its runner is gone)", run_id)
    release_stale_locks(ctx)
    return marked


def release_stale_locks(ctx: EngineContext) -> dict[str, int]:
    """Stale locks removed per remote name (a remote that failed is left out)."""
    from vmkeep.engine.state.credentials import stored_credentials
    from vmkeep.remotes.location import open_remote
    from vmkeep.repository.locks import remove_stale_locks

    removed: dict[str, int] = {}
    for entry in ctx.registry.load():
        try:
            creds = stored_credentials(ctx.db, entry.name, ctx.secrets)
            removed[entry.name] = remove_stale_locks(open_remote(entry.location, creds))
        except (VmkeepError, OSError) as exc:
            log.warning("remote %s: stale locks not checked: %s", entry.name, exc)
            continue
        if removed[entry.name]:
            log.info("remote %s: removed %d stale lock(s)", entry.name, removed[entry.name])
    return removed
