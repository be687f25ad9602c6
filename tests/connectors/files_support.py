"""Helpers for the files connector tests: real tools (qemu-img, qemu-io, sfdisk, e2fsprogs),
skipping with the reason when one is missing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

SBIN_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"


def tool(name: str) -> str:
    """Path of a command-line tool, or skip the test saying which one is missing."""
    found = shutil.which(name, path=SBIN_PATH)
    if found is None:
        pytest.skip(f"{name} is not installed (apt-get install qemu-utils fdisk e2fsprogs)")
    return found


def run(*args: str | Path) -> str:
    """Run a tool, failing the test with its stderr when it fails."""
    cmd = [str(a) for a in args]
    exe = tool(cmd[0])
    proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed: {proc.stderr or proc.stdout}"
    return proc.stdout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_reader(reader: Any, piece: int = 4 << 20) -> str:
    """Hash a DiskReader's whole content, read in pieces as the backup engine does."""
    h = hashlib.sha256()
    for offset in range(0, reader.size, piece):
        data = reader.read(offset, piece)
        assert len(data) == min(piece, reader.size - offset)
        h.update(data)
    return h.hexdigest()


def qemu_raw(image: Path, out: Path) -> Path:
    """What qemu reads from an image, as a raw file."""
    run("qemu-img", "convert", "-O", "raw", image, out)
    return out


def qemu_data_ranges(image: Path) -> list[tuple[int, int]]:
    """Merged (offset, length) ranges that `qemu-img map` reports as data."""
    ranges: list[tuple[int, int]] = []
    for item in json.loads(run("qemu-img", "map", "--output=json", image)):
        if not item["data"]:
            continue
        if ranges and sum(ranges[-1]) == item["start"]:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + item["length"])
        else:
            ranges.append((item["start"], item["length"]))
    return ranges


def data_ranges(reader: Any) -> list[tuple[int, int]]:
    """Merged data extents of a reader, after checking they tile [0, size) in order."""
    pos = 0
    ranges: list[tuple[int, int]] = []
    for extent in reader.extents():
        assert extent.offset == pos and extent.length > 0
        pos += extent.length
        if extent.data:
            if ranges and sum(ranges[-1]) == extent.offset:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + extent.length)
            else:
                ranges.append((extent.offset, extent.length))
    assert pos == reader.size
    return ranges
