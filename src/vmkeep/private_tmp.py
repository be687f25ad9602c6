"""A process's private temporary directory, for what must not outlive the process: the
format 3 index when the cache is off or not writable (the whole index, 50 bytes a blob), the
spill of the blobs a backup adds, and the local image a restore over a remote libvirt URI
builds before its upload (as large as the disk).

It is removed at exit, but a killed process cannot do that, and each leak can be GiB. So
the name carries the owner's pid and start time (clock ticks since boot, as lock objects do,
docs/FORMAT.md §6), and a process creating its own first removes those of processes that
are gone. Only directories of our uid, never through a symlink."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from vmkeep.processes import is_running, start_time

PREFIX = "vmkeep-private-"
OLD_PREFIX = "vmkeep-index-"  # before it held more than the index
_mine: list[Path] = []


def private_dir() -> Path:
    """This process's directory (mode 0700), created on first use."""
    if not _mine:
        parent = Path(tempfile.gettempdir())
        remove_dead(parent)
        remove_dead(parent, OLD_PREFIX)
        me = os.getpid()
        made = tempfile.mkdtemp(prefix=f"{PREFIX}{me}-{start_time(me) or 0}-", dir=parent)
        _mine.append(Path(made))
        atexit.register(shutil.rmtree, made, True)
    return _mine[0]


def remove_dead(parent: Path, prefix: str = PREFIX) -> int:
    """Remove the directories `prefix` + pid + start time of processes no longer running;
    returns how many. A name without a pid (an older version's) is left alone: nothing tells
    whether it is in use."""
    removed = 0
    pattern = re.compile(re.escape(prefix) + r"(\d{1,7})-(\d{1,20})-[A-Za-z0-9_]{8}")
    try:
        names = [e.name for e in os.scandir(parent) if e.name.startswith(prefix)]
    except OSError:
        return 0
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or is_running(int(match[1]), match[2]):
            continue
        path = parent / name
        try:
            st = path.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            shutil.rmtree(path)
            removed += 1
        except OSError:
            continue  # removed by another process meanwhile, or not ours to remove
    return removed
