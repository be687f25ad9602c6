"""The one adapter base (filesystems/nodefs.py) over ext and FAT: its work budget now covers
them, so legitimate big directories and big files must still read in full, and the base
must keep what ext/FAT had (a case-insensitive FAT lookup names the entry as stored)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.filerestore_images import MiB, data, mkfs_ext, need, run
from vmkeep.errors import NotFoundError
from vmkeep.operations.filerestore.filesystems import open_filesystem
from vmkeep.operations.filerestore.filesystems.nodefs import DIR_CACHE_ENTRIES

BIG_DIR = DIR_CACHE_ENTRIES + 2000  # past the lookup cache: every lookup scans it


def test_ext_directory_past_the_lookup_cache_lists_and_looks_up(tmp_path: Path) -> None:
    need("mkfs.ext4")
    tree = tmp_path / "tree"
    (tree / "crowded").mkdir(parents=True)
    for i in range(BIG_DIR):
        (tree / "crowded" / f"f{i:05d}").write_bytes(b"%d" % i)
    image = mkfs_ext(tmp_path / "ext.fs", 64 * MiB, tree)
    with open(image, "rb") as fh:
        fs = open_filesystem(fh, image.stat().st_size, "test")
        names = [e.name for e in fs.listdir(b"/crowded")]
        assert sorted(names) == [b"f%05d" % i for i in range(BIG_DIR)]
        for i in (0, BIG_DIR // 2, BIG_DIR - 1):
            assert fs.lookup(b"/crowded/f%05d" % i).size == len(b"%d" % i)
            assert fs.open(b"/crowded/f%05d" % i).read() == b"%d" % i
        with pytest.raises(NotFoundError):
            fs.lookup(b"/crowded/f%05d" % BIG_DIR)
        assert fs.info.warnings == []


def test_fat32_file_of_many_clusters_reads_whole_and_looks_up_caselessly(tmp_path: Path) -> None:
    need("mkfs.vfat", "mcopy")
    content = data(5, 24 * MiB + 321)  # 49,000 clusters of 512 bytes: a long chain
    source = tmp_path / "Big-File.bin"
    source.write_bytes(content)
    image = tmp_path / "fat.fs"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    run("mkfs.vfat", "-F", "32", "-s", "1", str(image))
    run("mcopy", "-i", str(image), str(source), "::/")
    with open(image, "rb") as fh:
        fs = open_filesystem(fh, image.stat().st_size, "test")
        entry = fs.lookup(b"/BIG-FILE.BIN")
        assert (entry.name, entry.size) == (b"Big-File.bin", len(content))
        stream = fs.open(b"/big-file.bin")
        digest = hashlib.sha256()
        while block := stream.read(MiB):
            digest.update(block)
        assert digest.hexdigest() == hashlib.sha256(content).hexdigest()
        assert fs.info.warnings == []
