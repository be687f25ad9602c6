"""Hostile version 2 manifest objects (docs/FORMAT.md §5.5): whoever writes the remote may
truncate the object, move, swap or reorder its pieces, or (unencrypted: checksums are not
MACs) forge its head and pieces. Each is one IntegrityError line when the point or its
table is read, never a traceback, never an allocation sized by a hostile length, never a
table read as good with IDs it did not have."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import cli_environment, sha256
from tests.operations.test_table_points import backup as table_backup
from tests.operations.test_table_points import change as table_change
from tests.operations.test_table_points import make_vm as table_vm
from tests.repository.table_points import (
    CHUNK,
    Forged,
    flip,
    object_path,
    packed_repo,
    plain_piece,
    random_runs,
    small_tables,
    synthetic_point,
)
from vmkeep.connectors.files import FilesConnector
from vmkeep.errors import IntegrityError, VmkeepError
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.mirror import COPIED, FAILED, MirrorOptions, mirror
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import HEADER_SIZE, ID_SIZE, manifest_object_name
from vmkeep.repository.manifest import Manifest
from vmkeep.repository.manifest_table import TAIL, TableReader
from vmkeep.repository.repository import Repository
from vmkeep.repository.verify import verify

from .conftest import PASSPHRASE, Cli

DENSE = [(0, 16)]  # 4 pieces of 4 IDs, all the same length


@pytest.fixture(autouse=True)
def _small(monkeypatch: pytest.MonkeyPatch) -> None:
    small_tables(monkeypatch)


def _point(repo: Repository, seed: int, runs: list[tuple[int, int]] = DENSE) -> Manifest:
    point = synthetic_point([("big", 40 * CHUNK, random_runs(seed, runs))])
    repo.save_manifest(point)
    return point


def _read_all(repo: Repository, point_id: str) -> None:
    """Everything a reader may read of the point: its head, then every piece."""
    manifest = repo.load_manifest(point_id)
    for disk in manifest.disks:
        list(disk.entries())


def _refused(repo: Repository, point_id: str, *words: str) -> str:
    with pytest.raises(IntegrityError) as caught:
        _read_all(repo, point_id)
    message = str(caught.value)
    assert isinstance(caught.value, VmkeepError) and "\n" not in message
    assert point_id in message and any(w in message for w in words), message
    return message


@pytest.mark.parametrize("keep", [0, 6, 11, 200, -1, -5])
def test_a_truncated_object(tmp_path: Path, keep: int) -> None:
    repo = packed_repo(tmp_path / "r")
    point = _point(repo, 1)
    path = object_path(tmp_path / "r", point.id)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    _refused(repo, point.id, "corrupt", "bad header")


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_a_piece_swapped_in_from_another_point(tmp_path: Path, encryption: str) -> None:
    """Two points of the same layout: piece 1 of B copied over piece 1 of A (same offset and
    length) does not open as A's."""
    repo = packed_repo(tmp_path / "r", encryption)
    a, b = _point(repo, 1), _point(repo, 2)
    path_a, path_b = (object_path(tmp_path / "r", p.id) for p in (a, b))
    entry = repo.load_manifest(a.id).disks[0].table.pieces[1]  # type: ignore[union-attr]
    stolen = path_b.read_bytes()[entry.offset : entry.offset + entry.length]
    data = bytearray(path_a.read_bytes())
    data[entry.offset : entry.offset + entry.length] = stolen
    path_a.write_bytes(bytes(data))
    assert "piece 1" in _refused(repo, a.id, "corrupt")
    _read_all(repo, b.id)  # B untouched


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_pieces_reordered(tmp_path: Path, encryption: str) -> None:
    repo = packed_repo(tmp_path / "r", encryption)
    point = _point(repo, 3)
    path = object_path(tmp_path / "r", point.id)
    p0, p1 = repo.load_manifest(point.id).disks[0].table.pieces[:2]  # type: ignore[union-attr]
    assert p0.length == p1.length
    data = bytearray(path.read_bytes())
    one, two = data[p0.offset : p0.offset + p0.length], data[p1.offset : p1.offset + p1.length]
    data[p0.offset : p0.offset + p0.length], data[p1.offset : p1.offset + p1.length] = two, one
    path.write_bytes(bytes(data))
    _refused(repo, point.id, "corrupt")


def test_a_flipped_byte_in_a_piece(tmp_path: Path) -> None:
    repo = packed_repo(tmp_path / "r", "aes-256-gcm")
    point = _point(repo, 4)
    entry = repo.load_manifest(point.id).disks[0].table.pieces[2]  # type: ignore[union-attr]
    flip(object_path(tmp_path / "r", point.id), entry.offset + 20)
    repo.load_manifest(point.id)  # the head is intact: the point lists
    _refused(repo, point.id, "authentication failed")


def _forge(
    tmp_path: Path, change: Callable[[Forged], None], seed: int = 5
) -> tuple[Repository, str]:
    repo = packed_repo(tmp_path / "r")
    point = _point(repo, seed)
    forged = Forged(object_path(tmp_path / "r", point.id), point.id)
    change(forged)
    return repo, point.id


def _set_piece(index: int, position: int, value: int) -> Callable[[Forged], None]:
    def change(f: Forged) -> None:
        f.table(0)["pieces"][index][position] = value
        f.write()

    return change


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_set_piece(3, 2, 10**6), ("past the table's end",)),  # offset past the object
        (_set_piece(3, 3, 2**40), ("bad length",)),  # length over the piece bound
        (_set_piece(1, 2, HEADER_SIZE), ("overlaps",)),  # overlaps piece 0
        (_set_piece(2, 0, 1), ("out of order",)),  # first index going back
        (_set_piece(3, 0, 40), ("outside the disk",)),  # first index past the disk
        (_set_piece(0, 1, 2**64), ("out of order", "outside")),  # entries overflow
    ],
)
def test_a_forged_directory(
    tmp_path: Path, change: Callable[[Forged], None], words: tuple[str, ...]
) -> None:
    repo, point_id = _forge(tmp_path, change)
    with pytest.raises(IntegrityError) as caught:
        repo.load_manifest(point_id)
    assert "malformed" in str(caught.value) and any(w in str(caught.value) for w in words)


@pytest.mark.parametrize("ids", [2**64, 2**31, 15, 17, 0, -1, "16", 16.0])
def test_a_forged_id_count(tmp_path: Path, ids: object) -> None:
    def change(f: Forged) -> None:
        f.table(0)["ids"] = ids
        f.write()

    repo, point_id = _forge(tmp_path, change)
    with pytest.raises(IntegrityError, match="malformed"):
        repo.load_manifest(point_id)


def test_a_table_beside_runs_or_in_a_version_1_object(tmp_path: Path) -> None:
    def change(f: Forged) -> None:
        f.doc["disks"][0]["runs"] = [[0, 1]]
        f.write()

    repo, point_id = _forge(tmp_path, change)
    with pytest.raises(IntegrityError, match="outside a version 2 object, or runs besides it"):
        repo.load_manifest(point_id)


@pytest.mark.parametrize(
    "records",
    [
        [(0, 2**32 - 1, bytes(4 * ID_SIZE))],  # a count far past the piece: no allocation
        [(0, 0, b""), (0, 3, bytes(3 * ID_SIZE))],  # an empty record
        [(0, 3, bytes(3 * ID_SIZE))],  # fewer IDs than the directory says
        [(1, 4, bytes(4 * ID_SIZE))],  # not at the directory's first index
        [(0, 2, bytes(2 * ID_SIZE)), (1, 1, bytes(ID_SIZE))],  # overlapping records
        [(0, 1, bytes(ID_SIZE)), (6, 2, bytes(2 * ID_SIZE))],  # past the next piece's first
        [(0, 3, bytes(3 * ID_SIZE)), (3, 1, bytes(7))],  # a record cut short
    ],
)
def test_a_forged_piece(tmp_path: Path, records: list[tuple[int, int, bytes]]) -> None:
    """Resealed with a valid checksum for its place, so only the record checks stand."""

    def change(f: Forged) -> None:
        piece = f.reseal_piece(0, 0, plain_piece(records))
        old = f.piece(0, 0)
        f.table(0)["pieces"][0][3] = len(piece)
        shift = len(piece) - len(old)
        for entry in f.table(0)["pieces"][1:]:
            entry[2] += shift
        f.write(region=piece + f.region[len(old) :])

    repo, point_id = _forge(tmp_path, change)
    tracemalloc.start()
    try:
        _refused(repo, point_id, "corrupt")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the whole-object read's bound (4 MiB), not 2**32 IDs


@pytest.mark.parametrize("length", [0, 2**32 - 1, "size", "size-11"])
def test_a_head_length_out_of_bounds(tmp_path: Path, length: object) -> None:
    repo = packed_repo(tmp_path / "r")
    point = _point(repo, 6)
    path = object_path(tmp_path / "r", point.id)
    data = path.read_bytes()
    value = {"size": len(data), "size-11": len(data) - 11}.get(str(length), length)
    assert isinstance(value, int)
    path.write_bytes(data[: -TAIL.size] + TAIL.pack(value))
    with pytest.raises(IntegrityError, match="head's length is out of bounds"):
        repo.load_manifest(point.id)


def test_a_head_moved_by_its_length(tmp_path: Path) -> None:
    """A tail that points the head a byte off: the head does not open."""
    repo = packed_repo(tmp_path / "r", "aes-256-gcm")
    point = _point(repo, 7)
    path = object_path(tmp_path / "r", point.id)
    data = path.read_bytes()
    (length,) = TAIL.unpack(data[-TAIL.size :])
    path.write_bytes(data[: -TAIL.size] + TAIL.pack(length + 1))
    with pytest.raises(IntegrityError, match="authentication failed"):
        repo.load_manifest(point.id)


def test_the_cli_on_a_table_point_with_a_bad_piece(
    cli: Cli, repo_dir: Path, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    """A real backup of a 64 MiB VM (16 chunks of 4 MiB: a table of 4 pieces), made in
    process with the threshold lowered, read by the real CLI: list, verify and restore work;
    with a byte of a piece flipped, verify and restore end in one `error:` line (exit 3,
    never 70); list reads heads only (the table's `data_bytes`: FORMAT.md §5.5), so it still
    shows the point, as it shows a point whose chunks a fault deleted: verify is the check."""
    vm = make_vm("big")
    rng = random.Random(9)
    with open(vm / "disk0.raw", "r+b") as f:
        for _ in range(16):  # every chunk of data, so that all 16 are stored
            f.write(rng.randbytes(4 << 20))
    with cli_environment(cli):
        repo = Repository.open(LocalRemote(repo_dir), lambda: PASSPHRASE.encode())
        report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
        point = report.restore_point
        table = repo.load_manifest(point).disks[0].table
    assert isinstance(table, TableReader) and len(table.pieces) == 4
    assert object_path(repo_dir, point).read_bytes()[4] == 2
    listed = cli("list", "--remote", str(repo_dir), "--json").json()
    assert [p["restore_point"] for p in listed["restore_points"]] == [point]
    cli("verify", "--remote", str(repo_dir))
    out = tmp_path / "out"
    cli("restore", point, "--remote", str(repo_dir), "--to", str(out))
    assert sha256(next(out.rglob("disk0.raw"))) == sha256(vm / "disk0.raw")

    flip(object_path(repo_dir, point), table.pieces[2].offset + 40)
    run = cli("verify", "--remote", str(repo_dir), ok=False)
    assert run.code == 3 and "piece 2 is corrupt" in run.err
    run = cli("restore", point, "--remote", str(repo_dir), "--to", str(tmp_path / "o2"), ok=False)
    assert run.code == 3 and len(run.err.strip().splitlines()) == 1
    assert "piece 2 is corrupt: authentication failed" in run.err
    listed = cli("list", "--remote", str(repo_dir), "--json").json()
    assert [p["restore_point"] for p in listed["restore_points"]] == [point]
    assert not listed.get("unreadable")


def test_a_version_2_object_in_a_format_2_repository(tmp_path: Path) -> None:
    """Formats 1 and 2 never hold version 2 objects: one put there is refused (bad header)."""
    source = packed_repo(tmp_path / "r3")
    point = _point(source, 8)
    other = Repository.init(LocalRemote(tmp_path / "r2"), "none", lambda: b"x", chunk_size=CHUNK)
    other.remote.put(
        manifest_object_name(point.id), object_path(tmp_path / "r3", point.id).read_bytes()
    )
    with pytest.raises(IntegrityError, match="bad header"):
        other.load_manifest(point.id)


@pytest.mark.parametrize("value", ["absent", 40 * CHUNK + 1, -1, "1024", 2**70, 1.5, None])
def test_a_forged_or_missing_data_bytes_is_counted_by_a_walk(tmp_path: Path, value: object) -> None:
    """The head's optional `data_bytes` (listings, a restore's progress) outside [0, disk
    size], not an integer, or absent (an older writer's object): the table is walked for it,
    and the point reads as before."""

    def change(f: Forged) -> None:
        assert f.table(0)["data_bytes"] == 16 * CHUNK  # what the writer counted
        if value == "absent":
            del f.table(0)["data_bytes"]
        else:
            f.table(0)["data_bytes"] = value
        f.write()

    repo, point_id = _forge(tmp_path, change)
    disk = repo.load_manifest(point_id).disks[0]
    assert isinstance(disk.table, TableReader) and disk.table.data_bytes is None
    assert disk.nonzero_bytes() == 16 * CHUNK


def test_a_data_bytes_that_disagrees_with_the_table_is_found_by_verify(tmp_path: Path) -> None:
    """Within bounds but not the table's: a listing shows it (heads only), verify (which
    walks every piece) reports the point corrupt, so gc refuses until it is dealt with."""

    def change(f: Forged) -> None:
        f.table(0)["data_bytes"] = 15 * CHUNK
        f.write()

    repo, point_id = _forge(tmp_path, change)
    assert repo.load_manifest(point_id).disks[0].nonzero_bytes() == 15 * CHUNK
    report = verify(repo, None, SilentProgress())
    assert not report.ok and [p.point_id for p in report.corrupt_manifests] == [point_id]
    error = report.corrupt_manifests[0].error
    assert f"{16 * CHUNK} bytes of data, its head says {15 * CHUNK}" in error and "\n" not in error


def test_a_mirror_of_a_point_with_a_bad_piece_fails_it_alone(tmp_path: Path) -> None:
    """A flipped byte in a piece of a source delta: the mirror fails that point with one line
    naming the piece, the target gets no manifest of it; the full before it is copied."""
    source = packed_repo(tmp_path / "s", "aes-256-gcm")
    target = packed_repo(tmp_path / "t", "aes-256-gcm")
    vm = table_vm(tmp_path / "vms")
    good = table_backup(source, vm, "full")
    table_change(vm, [3], seed=4)
    bad = table_backup(source, vm, "delta")
    table = source.load_manifest(bad).disks[0].table
    assert isinstance(table, TableReader)
    flip(object_path(tmp_path / "s", bad), table.pieces[1].offset + 20)
    report = mirror(source, target, MirrorOptions(), SilentProgress())
    results = {p.point_id: p for p in report.points}
    assert results[good].status == COPIED
    assert results[bad].status == FAILED and "\n" not in results[bad].reason
    assert "piece 1 is corrupt" in results[bad].reason
    assert not object_path(tmp_path / "t", bad).exists()
    assert object_path(tmp_path / "t", good).exists()
