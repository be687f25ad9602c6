"""The work budget of the adapter base (filesystems/nodefs.py) now covers ext too: a
directory whose block pointers all name the same block, claiming just under ext4's 4 GiB
directory limit, makes a lookup of a missing name end with an ImageError after a bounded
amount of reading, instead of scanning 4 GiB of the same block (made by mkfs.ext2, then
its inode pointed by debugfs at indirect blocks written here)."""

from __future__ import annotations

import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.filerestore_images import MiB, need
from vmkeep.errors import ImageError
from vmkeep.operations.filerestore.filesystems import open_filesystem

BLOCK = 4096
POINTERS = BLOCK // 4


def debugfs(image: Path, *requests: str) -> str:
    args = ["debugfs", "-w"] if len(requests) > 1 else ["debugfs"]
    script = "\n".join(requests) + "\n"
    return subprocess.run(
        [*args, "-f", "-", str(image)], input=script, capture_output=True, text=True, check=True
    ).stdout


def test_a_directory_of_one_block_repeated_ends_within_the_budget(tmp_path: Path) -> None:
    need("mkfs.ext2", "debugfs")
    tree = tmp_path / "tree"
    (tree / "huge").mkdir(parents=True)
    (tree / "huge" / "x").write_text("x\n")
    image = tmp_path / "ext2.fs"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(
        ["mkfs.ext2", "-q", "-F", "-b", str(BLOCK), "-d", str(tree), str(image)], check=True
    )
    stat = debugfs(image, "stat /huge")
    block = int(re.search(r"\(0\):(\d+)", stat).group(1))  # type: ignore[union-attr]
    indirect, double = 16000, 16001  # free: a fresh file system fills from the start
    with open(image, "r+b") as f:
        f.seek(indirect * BLOCK)
        f.write(struct.pack(f"<{POINTERS}I", *[block] * POINTERS))
        f.seek(double * BLOCK)
        f.write(struct.pack(f"<{POINTERS}I", *[indirect] * POINTERS))
    blocks = 12 + POINTERS + POINTERS * POINTERS
    size = min(blocks, (4 << 30) // BLOCK - 1) * BLOCK
    debugfs(
        image,
        *[f"sif /huge block[{i}] {block}" for i in range(1, 12)],
        f"sif /huge block[IND] {indirect}",
        f"sif /huge block[DIND] {double}",
        f"sif /huge size {size}",
    )
    with open(image, "rb") as fh:
        fs = open_filesystem(fh, image.stat().st_size, "test")
        assert fs.lookup(b"/huge/x").size == 2  # the first block is the real one
        start = time.monotonic()
        with pytest.raises(ImageError, match="too much work"):
            fs.lookup(b"/huge/missing")
        assert time.monotonic() - start < 60
