"""`vmkeep files ls|get` on a VM whose disks the real tools made: an MBR disk with primary and
logical partitions (vfat, ext4 with the full tree, ext2, exFAT), a 4Kn GPT disk, an LVM VG
spanning two disks (linear and striped LVs), a second VG with the same name on a whole-disk
PV, and a whole-disk ext4. Everything is backed up through vmkeep, then every listed entry and
every extracted file is compared (bytes and metadata) with the source tree."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import PASSPHRASE, Cli
from tests.filerestore_images import (
    NON_UTF8,
    SPARSE_SIZE,
    XATTR,
    MiB,
    full_tree,
    loop_attach,
    loop_detach,
    lv_layout,
    lvm,
    mkfs_ext,
    mkfs_vfat,
    need,
    partition,
    put,
    run,
    small_tree,
    vm_dir,
    write_lv,
)

EXTENT = 4 * MiB
PE_START = 1 * MiB


@dataclass
class Built:
    cli: Cli
    repo: str
    point: str
    trees: dict[str, Path]  # volume address -> source tree
    sizes: dict[str, int]  # volume address -> size made by sfdisk / lvcreate


def _mbr_disk(work: Path, trees: dict[str, Path], sizes: dict[str, int]) -> Path:
    disk = work / "disk0.raw"
    script = "label: dos\n,8M,c\n,40M,83\n,,5\n,8M,83\n,8M,7\n"
    parts = partition(disk, 96 * MiB, script)
    offsets = {1: parts[0], 2: parts[1], 5: parts[3], 6: parts[4]}
    trees["disk0:1"] = small_tree(work / "t-fat", "fat")
    trees["disk0:2"] = full_tree(work / "t-full")
    trees["disk0:5"] = small_tree(work / "t-ext2", "logical5")
    put(disk, offsets[1][0], mkfs_vfat(work / "fat.fs", offsets[1][1], trees["disk0:1"], "FATLAB"))
    put(disk, offsets[2][0], mkfs_ext(work / "full.fs", offsets[2][1], trees["disk0:2"]))
    put(
        disk,
        offsets[5][0],
        mkfs_ext(work / "e2.fs", offsets[5][1], trees["disk0:5"], "ext2", "logical5"),
    )
    exfat = work / "exfat.fs"
    with open(exfat, "wb") as f:
        f.truncate(offsets[6][1])
    run("mkfs.exfat", "-L", "EXLAB", str(exfat))
    put(disk, offsets[6][0], exfat)
    for number, (_, size) in offsets.items():
        sizes[f"disk0:{number}"] = size
    return disk


def _gpt4k_disk(work: Path, trees: dict[str, Path], sizes: dict[str, int]) -> Path:
    disk = work / "disk1.raw"
    ((offset, size),) = partition(disk, 32 * MiB, "label: gpt\n,16M,L\n", sector_size=4096)
    trees["disk1:1"] = small_tree(work / "t-gpt", "gpt4k")
    put(disk, offset, mkfs_ext(work / "gpt.fs", size, trees["disk1:1"]))
    sizes["disk1:1"] = size
    return disk


def _lvm_disks(work: Path, trees: dict[str, Path], sizes: dict[str, int]) -> dict[str, Path]:
    disks = {"disk2": work / "disk2.raw", "disk3": work / "disk3.raw", "disk4": work / "disk4.raw"}
    for path in disks.values():
        with open(path, "wb") as f:
            f.truncate(48 * MiB)
    loops = {name: loop_attach(path) for name, path in disks.items() if name != "disk4"}
    by_loop = {loop: disks[name] for name, loop in loops.items()}
    try:
        lvm("pvcreate", "-q", *loops.values())
        lvm("vgcreate", "-q", "vgdata", *loops.values())
        lvm("lvcreate", "-q", "-an", "-Zn", "-i2", "-I64k", "-L", "16M", "-n", "str", "vgdata")
        lvm("lvcreate", "-q", "-an", "-Zn", "-L", "48M", "-n", "lin", "vgdata")  # spans both
        layouts = {lv: lv_layout("vgdata", lv) for lv in ("lin", "str")}
    finally:
        for loop in loops.values():
            loop_detach(loop)
    for lv, (areas, stripe) in layouts.items():
        size = sum(count for _, _, count in areas) * EXTENT
        tree = small_tree(work / f"t-{lv}", lv)
        image = mkfs_ext(work / f"{lv}.fs", size, tree)
        write_lv(image, [(by_loop[d], f, c) for d, f, c in areas], stripe, EXTENT, PE_START)
        trees[f"disk2:vgdata/{lv}"] = tree
        sizes[f"disk2:vgdata/{lv}"] = size
    solo = loop_attach(disks["disk4"])
    try:
        lvm("pvcreate", "-q", solo)
        lvm("vgcreate", "-q", "vgdata", solo)  # the same VG name as disk2/disk3's
        lvm("lvcreate", "-q", "-an", "-Zn", "-L", "8M", "-n", "solo", "vgdata")
        (areas, _) = lv_layout("vgdata", "solo")
    finally:
        loop_detach(solo)
    tree = small_tree(work / "t-solo", "solo")
    image = mkfs_ext(work / "solo.fs", 8 * MiB, tree)
    write_lv(image, [(disks["disk4"], f, c) for _, f, c in areas], 0, EXTENT, PE_START)
    trees["disk4:vgdata/solo"] = tree
    sizes["disk4:vgdata/solo"] = 8 * MiB
    return disks


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    need(
        "sfdisk",
        "mkfs.ext4",
        "mkfs.ext2",
        "mkfs.vfat",
        "mcopy",
        "mkfs.exfat",
        "pvcreate",
        "losetup",
    )
    work = tmp_path_factory.mktemp("images")
    trees: dict[str, Path] = {}
    sizes: dict[str, int] = {}
    disks = {"disk0": _mbr_disk(work, trees, sizes), "disk1": _gpt4k_disk(work, trees, sizes)}
    disks.update(_lvm_disks(work, trees, sizes))
    trees["disk5"] = small_tree(work / "t-whole", "whole")
    disks["disk5"] = mkfs_ext(work / "disk5.raw", 16 * MiB, trees["disk5"], label="whole")
    vm = vm_dir(work / "vm", disks)
    cli = Cli(work / "home")
    repo = str(work / "repo")
    cli("init", repo, "--chunk-size", "256K")
    point = cli("backup", str(vm), "--remote", repo, "--json").json()["restore_point"]
    return Built(cli, repo, point, trees, sizes)


def files(b: Built, *args: str, ok: bool = True) -> object:
    return b.cli("files", *args, "--remote", b.repo, ok=ok)


def test_volumes_listed_with_linux_numbers_exact_sizes_and_file_systems(built: Built) -> None:
    doc = built.cli("files", "ls", built.point, "--remote", built.repo, "--json").json()
    volumes = {v["address"]: v for v in doc["volumes"]}
    assert set(volumes) == {
        "disk0", "disk0:1", "disk0:2", "disk0:5", "disk0:6", "disk1", "disk1:1",
        "disk2", "disk3", "disk4", "disk5",
        "disk2:vgdata/lin", "disk2:vgdata/str", "disk4:vgdata/solo",
    }  # fmt: skip
    assert volumes["disk0"]["type"] == "mbr" and volumes["disk1"]["type"] == "gpt"
    for address, size in built.sizes.items():
        assert volumes[address]["size"] == size, address  # GPT: not one sector short
    fs = {a: (v["filesystem"], v["label"]) for a, v in volumes.items()}
    assert fs["disk0:1"] == ("vfat", "FATLAB")
    assert fs["disk0:2"][0] == "ext4"
    assert fs["disk0:5"] == ("ext2", "logical5")
    assert fs["disk0:6"] == ("exfat", "EXLAB")
    assert fs["disk1:1"][0] == "ext4" and fs["disk5"] == ("ext4", "whole")
    assert volumes["disk2:vgdata/lin"]["disks"] == ["disk2", "disk3"]
    assert volumes["disk2:vgdata/str"]["type"] == "striped"
    assert volumes["disk2:vgdata/lin"]["type"] == "linear"
    assert volumes["disk4:vgdata/solo"]["disks"] == ["disk4"]
    text = built.cli("files", "ls", built.point, "--remote", built.repo).out
    assert "disk0:5" in text and "logical5" in text


def _walk_source(root: Path) -> Iterator[tuple[bytes, os.stat_result]]:
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            yield os.path.relpath(full, os.fsencode(root)), os.lstat(full)


def _listed(b: Built, volume: str) -> dict[bytes, dict[str, object]]:
    """Every entry of a volume as `files ls --json` gives it: the JSON of the operation the
    command prints (listing.entry_json), walked in one process (one CLI call per directory
    would take minutes); test_cli_listing_is_the_operations_json checks the CLI's output."""
    from vmkeep.operations.filerestore.listing import entry_json
    from vmkeep.operations.filerestore.session import PointFiles
    from vmkeep.remotes.local import LocalRemote
    from vmkeep.repository.repository import Repository

    repo = Repository.open(LocalRemote(Path(b.repo)), lambda *_: PASSPHRASE.encode())
    out: dict[bytes, dict[str, object]] = {}
    with PointFiles(repo, b.point) as point:
        fs = point.filesystem(volume)
        todo = [b""]
        while todo:
            rel = todo.pop()
            for entry in fs.listdir(b"/" + rel):
                path = rel + b"/" + entry.name if rel else entry.name
                out[path] = json.loads(json.dumps(entry_json(entry)))
                if entry.kind == "dir":
                    todo.append(path)
    return out


def test_cli_listing_is_the_operations_json(built: Built) -> None:
    everything = _listed(built, "disk0:2")
    args = ("files", "ls", built.point, "disk0:2/docs", "--remote", built.repo, "--json")
    doc = built.cli(*args).json()
    assert doc["filesystem"] == "ext4" and doc["dirty"] is False
    assert {b"docs/" + e["name"].encode(): e for e in doc["entries"]} == {
        k: v for k, v in everything.items() if k.startswith(b"docs/") and k.count(b"/") == 1
    }
    text = built.cli("files", "ls", built.point, "disk0:2/", "--remote", built.repo).out
    assert "fast-symlink -> docs/日本語.txt" in text
    assert "latin1-\\xe9t\\xe9.txt" in text  # a non-UTF-8 name shown escaped


KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo"}


@pytest.mark.parametrize("volume", ["disk0:2", "disk0:5", "disk2:vgdata/str"])
def test_every_listed_entry_matches_the_source(built: Built, volume: str) -> None:
    listed = _listed(built, volume)
    listed.pop(b"lost+found", None)
    source = dict(_walk_source(built.trees[volume]))
    assert set(listed) == set(source)
    for path, st in source.items():
        e = listed[path]
        assert e["kind"] == KINDS[stat.S_IFMT(st.st_mode)], path
        assert int(str(e["mode"]), 8) == stat.S_IMODE(st.st_mode), path
        assert (e["uid"], e["gid"]) == (st.st_uid, st.st_gid), path
        assert e["nlink"] == st.st_nlink, path
        assert int(str(e["mtime_ns"])) // 10**9 == st.st_mtime_ns // 10**9, path  # mke2fs -d: s
        if e["kind"] in ("file", "symlink"):
            assert e["size"] == st.st_size, path
        if e["kind"] == "symlink":
            target = os.readlink(os.path.join(os.fsencode(built.trees[volume]), path))
            assert e["target"] == os.fsdecode(target), path
    if volume == "disk0:2":
        assert listed[b"big.bin"]["inode"] == listed[b"docs/big-hardlink.bin"]["inode"]
        assert listed[NON_UTF8]["name_hex"] == NON_UTF8.hex()
        assert listed[b"sparse.img"]["size"] == SPARSE_SIZE


def _sha(path: Path | bytes) -> str:
    """The content's hash, reading only data regions (SEEK_DATA): a 5 GiB sparse file
    hashes in milliseconds; zero 4 KiB blocks are left out, so holes and written zeros
    hash alike, and each block is hashed with its offset."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            start -= start % 4096
            while start < end:
                block = os.pread(fd, min(4096, end - start), start)
                if block.count(0) != len(block):
                    h.update(start.to_bytes(8, "little") + block)
                start += len(block)
            pos = end
    finally:
        os.close(fd)
    return h.hexdigest()


def test_get_to_dir_restores_bytes_and_metadata(built: Built, tmp_path: Path) -> None:
    target = tmp_path / "out"
    built.cli(
        "files", "get", built.point, "disk0:2", "/", "--to", str(target), "--remote", built.repo
    )
    src = built.trees["disk0:2"]
    got = dict(_walk_source(target))
    got.pop(b"lost+found", None)
    expected = dict(_walk_source(src))
    assert set(got) == set(expected)
    for path, st in expected.items():
        g = got[path]
        assert stat.S_IFMT(g.st_mode) == stat.S_IFMT(st.st_mode), path
        assert stat.S_IMODE(g.st_mode) == stat.S_IMODE(st.st_mode), path
        assert (g.st_uid, g.st_gid) == (st.st_uid, st.st_gid), path  # as root
        assert g.st_mtime_ns // 10**9 == st.st_mtime_ns // 10**9, path
        if stat.S_ISREG(st.st_mode):
            assert _sha(os.path.join(os.fsencode(target), path)) == _sha(
                os.path.join(os.fsencode(src), path)
            ), path
        if stat.S_ISLNK(st.st_mode):
            assert os.readlink(os.path.join(os.fsencode(target), path)) == os.readlink(
                os.path.join(os.fsencode(src), path)
            )
    assert got[b"big.bin"].st_ino == got[b"docs/big-hardlink.bin"].st_ino  # a hard link
    assert got[b"sparse.img"].st_blocks * 512 < 16 * MiB  # holes stay holes
    assert os.getxattr(target / "docs" / "日本語.txt", XATTR[0]) == XATTR[1]
    assert not (tmp_path / "outside").exists()  # the escaping symlink was not followed


@pytest.mark.parametrize(
    "volume",
    [
        "disk0:1",
        "disk0:5",
        "disk1:1",
        "disk2:vgdata/lin",
        "disk2:vgdata/str",
        "disk4:vgdata/solo",
        "disk5",
    ],
)
def test_get_from_every_kind_of_volume(built: Built, tmp_path: Path, volume: str) -> None:
    """Content proves the mapping: a striped LV read end to end would give other bytes."""
    target = tmp_path / "out"
    built.cli("files", "get", built.point, volume, "/", "--to", str(target), "--remote", built.repo)
    src = built.trees[volume]
    for path, st in _walk_source(src):
        if stat.S_ISREG(st.st_mode):
            assert _sha(os.path.join(os.fsencode(target), path)) == _sha(
                os.path.join(os.fsencode(src), path)
            ), path


def test_lv_reachable_through_every_disk_of_its_vg(built: Built) -> None:
    for disk in ("disk2", "disk3"):
        doc = built.cli(
            "files", "ls", built.point, f"{disk}:vgdata/str/sub", "--remote", built.repo, "--json"
        ).json()
        assert {e["name"] for e in doc["entries"]} == {"data.bin", "日本語.txt"}
    doc = built.cli(
        "files", "ls", built.point, "disk4:vgdata/solo", "--remote", built.repo, "--json"
    ).json()
    assert "solo.txt" in {e["name"] for e in doc["entries"]}


def test_tar_holds_links_xattrs_and_raw_names(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "got.tar"
    built.cli(
        "files",
        "get",
        built.point,
        "disk0:2",
        "/docs",
        "/big.bin",
        "/fast-symlink",
        "/" + os.fsdecode(NON_UTF8),
        "--tar",
        str(out),
        "--remote",
        built.repo,
    )
    src = built.trees["disk0:2"]
    with tarfile.open(out, encoding="utf-8", errors="surrogateescape") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert (
            members["fast-symlink"].issym()
            and members["fast-symlink"].linkname == "docs/日本語.txt"
        )
        link = (
            members["big.bin"] if members["big.bin"].islnk() else members["docs/big-hardlink.bin"]
        )
        assert link.islnk()
        assert (
            members["docs/日本語.txt"].pax_headers["SCHILY.xattr.user.comment"] == XATTR[1].decode()
        )
        assert os.fsdecode(NON_UTF8) in members
        for name in ("docs/Ελληνικά.md", "docs/big-hardlink.bin"):
            m = members[name]
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                assert f.read() == (src / name).read_bytes()
        assert (
            members["docs/русский.txt"].mtime == (src / "docs" / "русский.txt").stat().st_mtime // 1
        )


def test_zip_of_a_fat_volume(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "got.zip"
    built.cli(
        "files", "get", built.point, "disk0:1", "/", "--zip", str(out), "--remote", built.repo
    )
    src = built.trees["disk0:1"]
    with zipfile.ZipFile(out) as z:
        assert z.read("sub/data.bin") == (src / "sub" / "data.bin").read_bytes()
        assert z.read("sub/日本語.txt") == b"ja\n"
        assert z.read("fat.txt") == (src / "fat.txt").read_bytes()


def test_get_never_replaces_and_refuses_an_existing_archive(built: Built, tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "fat.txt").write_text("mine")
    run_ = built.cli(
        "files",
        "get",
        built.point,
        "disk0:1",
        "/fat.txt",
        "--to",
        str(target),
        "--remote",
        built.repo,
        ok=False,
    )
    assert "already exists" in run_.err
    assert (target / "fat.txt").read_text() == "mine"
    archive = tmp_path / "a.tar"
    archive.write_text("keep")
    built.cli(
        "files",
        "get",
        built.point,
        "disk0:1",
        "/",
        "--tar",
        str(archive),
        "--remote",
        built.repo,
        ok=False,
    )
    assert archive.read_text() == "keep"


def test_paging_a_directory(built: Built) -> None:
    args = ("files", "ls", built.point, "disk0:2/docs", "--remote", built.repo, "--json")
    everything = [e["name"] for e in built.cli(*args).json()["entries"]]
    assert len(everything) == 8
    page = [e["name"] for e in built.cli(*args, "--offset", "2", "--limit", "3").json()["entries"]]
    assert page == everything[2:5]


def test_errors_are_one_line(built: Built) -> None:
    for where in ("disk0:9", "disk9", "disk0:2/no/such", "disk0:vgnone/lv", "disk0"):
        r = built.cli(
            "files",
            "ls",
            built.point,
            where + ("/x" if where == "disk0" else ""),
            "--remote",
            built.repo,
            ok=False,
        )
        assert r.code not in (0, 70)
    r = built.cli(
        "files", "ls", built.point, "disk0:2/fast-symlink/x", "--remote", built.repo, ok=False
    )
    assert r.code not in (0, 70)


def test_tar_to_stdout_keeps_stdout_for_the_archive(built: Built, tmp_path: Path) -> None:
    import io
    import subprocess

    from tests.e2e.conftest import VMKEEP

    args = [VMKEEP, "files", "get", built.point, "disk0:1", "/", "--tar", "-", "--json"]
    done = subprocess.run(
        [*args, "--remote", built.repo], capture_output=True, env=built.cli.env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        names = set(tar.getnames())
    assert {"fat.txt", "sub", "sub/data.bin"} <= names
    assert b'"files": 3' in done.stderr  # the summary went to stderr
