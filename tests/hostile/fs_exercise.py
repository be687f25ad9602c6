"""Run in a child process with its address space capped: open an image with the file system
adapters and touch everything (list, look up, xattrs, read every file), then print what
happened as JSON. A hang is the parent's timeout, unbounded memory a MemoryError here, any
exception other than ImageError/NotFoundError a traceback: each fails the test."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
from typing import Any

LIMIT = 2 << 30  # address space: the interpreter and dissect need a few hundred MiB
MAX_ENTRIES = 20_000


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
    from vmkeep.errors import ImageError, NotFoundError
    from vmkeep.operations.filerestore.filesystems import open_filesystem

    image = sys.argv[1]
    result: dict[str, Any] = {"open_error": None, "errors": [], "warnings": [], "read": {}}
    try:
        fs = open_filesystem(open(image, "rb"), os.path.getsize(image), "hostile")  # noqa: SIM115
    except ImageError as exc:
        result["open_error"] = str(exc)
    else:
        pending, seen = [b"/"], 0
        while pending and seen < MAX_ENTRIES:
            path = pending.pop()
            try:
                for entry in fs.listdir(path):
                    seen += 1
                    full = path.rstrip(b"/") + b"/" + entry.name
                    try:
                        fs.lookup(full)
                        fs.xattrs(full)
                        if entry.kind == "dir":
                            pending.append(full)
                        elif entry.kind == "file":
                            result["read"][full.decode(errors="surrogateescape")] = _sha(
                                fs.open(full)
                            )
                    except (ImageError, NotFoundError) as exc:
                        result["errors"].append(str(exc))
            except (ImageError, NotFoundError) as exc:
                result["errors"].append(str(exc))
        result["warnings"] = fs.info.warnings
    result["maxrss_kib"] = _peak_rss_kib()
    print(json.dumps(result))


def _peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited across fork+exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _sha(f: Any) -> str:
    """The content's sha256, or "long" past 64 MiB (a hostile size must not make a slow test)."""
    digest = hashlib.sha256()
    for _ in range(64):
        data = f.read(1 << 20)
        if not data:
            return digest.hexdigest()
        digest.update(data)
    return "long" if f.read(1) else digest.hexdigest()


if __name__ == "__main__":
    main()
