"""Hostile format 3 repositories: whoever can write the remote truncates a pack, points an
index entry past a pack's end or at another blob, swaps packs, plants another repository's
index object, or claims a huge blob length. Every time: one `error:` line, bounded memory,
`verify` reports the restore point bad, and nothing is restored wrong."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.blob_index import encode_index, index_object_name
from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE
from vmkeep.repository.packs import BlobEntry, pack_object_name
from vmkeep.repository.repository import Repository

from .conftest import PASSPHRASE_BYTES, Cli, measured, one_error_line

MiB = 1 << 20


def _open(repo: Path) -> Repository:
    return Repository.open(LocalRemote(str(repo)), lambda: PASSPHRASE_BYTES)


def _entries(repo: Path) -> list[BlobEntry]:
    store = _open(repo).packed
    assert store is not None
    return list(store.reload().index.entries())


def _replace_index(repo: Path, entries: list[BlobEntry]) -> None:
    """Whoever writes the remote can write an index object (unencrypted: a valid one; here
    we hold the key, which is the strongest case: the index verifies, its entries lie)."""
    r = _open(repo)
    for p in (repo / "index").iterdir():
        p.unlink()
    data, index_id = encode_index(r.sealer, r.config["id"], entries)
    r.remote.put(index_object_name(index_id), data)


def _pack_path(repo: Path, pack: bytes) -> Path:
    return repo / pack_object_name(pack)


def _biggest_block_pack(entries: list[BlobEntry]) -> bytes:
    sizes: dict[bytes, int] = {}
    for e in entries:
        if e.kind == KIND_BLOCK:
            sizes[e.pack] = sizes.get(e.pack, 0) + e.length
    return max(sizes, key=lambda p: sizes[p])


def truncate_pack(repo: Path) -> None:
    path = _pack_path(repo, _biggest_block_pack(_entries(repo)))
    os.truncate(path, path.stat().st_size // 2)


def entry_past_the_end(repo: Path) -> None:
    entries = _entries(repo)
    k = next(i for i, e in enumerate(entries) if e.kind == KIND_BLOCK)
    end = _pack_path(repo, entries[k].pack).stat().st_size
    entries[k] = dataclasses.replace(entries[k], offset=end + 100)
    _replace_index(repo, entries)


def entry_at_another_blob(repo: Path) -> None:
    entries = _entries(repo)
    blocks = [i for i, e in enumerate(entries) if e.kind == KIND_BLOCK]
    a, b = entries[blocks[0]], entries[blocks[-1]]
    entries[blocks[0]] = dataclasses.replace(a, pack=b.pack, offset=b.offset, length=b.length)
    _replace_index(repo, entries)


def packs_swapped(repo: Path) -> None:
    entries = _entries(repo)
    recipe = next(e.pack for e in entries if e.kind == KIND_RECIPE)
    block = _biggest_block_pack(entries)
    a, b = _pack_path(repo, recipe), _pack_path(repo, block)
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def huge_length(repo: Path) -> None:
    entries = [
        dataclasses.replace(e, length=(1 << 32) - 1) if e.kind == KIND_BLOCK else e
        for e in _entries(repo)
    ]
    _replace_index(repo, entries)


TAMPERS: dict[str, Callable[[Path], None]] = {
    "truncated pack": truncate_pack,
    "entry past the pack end": entry_past_the_end,
    "entry at another blob": entry_at_another_blob,
    "packs swapped": packs_swapped,
    "huge length": huge_length,
}


def _backed_up(cli: Cli, make_vm: Callable[..., Path], tmp_path: Path) -> tuple[Path, str]:
    repo = tmp_path / "repo"
    cli("init", str(repo), "--format", "3", "--pack-size", "1M")
    vm = make_vm("victim", 64 * MiB)
    point = cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"]
    return repo, point


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampered_packs_and_index(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path, tamper: str
) -> None:
    repo, point = _backed_up(cli, make_vm, tmp_path)
    TAMPERS[tamper](repo)
    where = tmp_path / "restored"
    run = measured(cli, "restore", point, "--remote", str(repo), "--to", str(where))
    line = one_error_line(run.run)
    assert run.run.code == 3, line
    assert run.peak_mib < 250, run.peak_mib  # no allocation of a claimed length
    verify = cli("verify", "--remote", str(repo), "--json", ok=False)
    assert verify.code == 3
    report = verify.json()
    assert not report["ok"]
    assert any(point in c["points"] for c in report["corrupt_chunks"])
    if tamper == "huge length":
        assert "claims" in line and "corrupt index" in line, line


def test_index_of_another_repository(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    repo, point = _backed_up(cli, make_vm, tmp_path)
    other = tmp_path / "other"  # same passphrase, its own key and id
    cli("init", str(other), "--format", "3", "--pack-size", "1M")
    vm = tmp_path / "vms" / "victim"
    cli("backup", str(vm), "--remote", str(other))
    for p in (repo / "index").iterdir():
        p.unlink()
    for p in (other / "index").iterdir():
        (repo / "index" / p.name).write_bytes(p.read_bytes())
    line = one_error_line(
        cli("restore", point, "--remote", str(repo), "--to", str(tmp_path / "r"), ok=False)
    )
    assert "missing from the repository" in line
    report = cli("verify", "--remote", str(repo), "--json", ok=False).json()
    (bad,) = report["corrupt_index"]
    assert "authentication failed" in bad["error"]
    assert any(point in c["points"] for c in report["corrupt_chunks"])
    packs = sorted(p.name for p in (repo / "packs").rglob("*") if p.is_file())
    gc = cli("gc", "--remote", str(repo), ok=False)
    assert "index object" in one_error_line(gc) and gc.code != 0
    assert sorted(p.name for p in (repo / "packs").rglob("*") if p.is_file()) == packs
