"""Objects on the remote that are far larger than the format allows (huge sparse files, a
zstd frame that claims gigabytes) are refused with one line, reading no more than their
bound: memory stays small whatever the remote holds."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import zstandard

from vmkeep.repository.format import HEADER_SIZE

from .conftest import Cli, measured, one_error_line, sparse

HUGE = 1 << 40  # 1 TiB of nothing: read whole it would exhaust this machine
PEAK_MIB = 300


def _backup(cli: Cli, vm: Path, repo: Path) -> str:
    return str(cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"])


def _one_chunk(repo: Path) -> Path:
    return sorted(p for p in (repo / "chunks").rglob("*") if p.is_file())[0]


def test_huge_config_is_refused(cli: Cli, repo_dir: Path) -> None:
    sparse(repo_dir / "config", HUGE)
    m = measured(cli, "list", "--remote", str(repo_dir))
    assert "config" in one_error_line(m.run) and "larger than" in m.run.err
    assert m.peak_mib < PEAK_MIB and m.seconds < 60


def test_huge_chunk_is_reported_corrupt(
    cli: Cli, chunk_repo: Path, make_vm: Any, tmp_path: Path
) -> None:
    """A chunk object (format 1); format 3's huge index entries: tests/hostile/test_packs.py."""
    repo_dir = chunk_repo
    point = _backup(cli, make_vm(), repo_dir)
    chunk = _one_chunk(repo_dir)
    sparse(chunk, HUGE)
    m = measured(cli, "verify", "--remote", str(repo_dir), "--json")
    assert m.run.code == 3, m.run.err
    bad = json.loads(m.run.out)["corrupt_chunks"]
    assert [b["chunk_id"] for b in bad] == [chunk.name], bad
    assert "larger than" in bad[0]["error"]
    assert m.peak_mib < PEAK_MIB
    target = tmp_path / "target"
    target.mkdir()
    m = measured(cli, "restore", point, "--remote", str(repo_dir), "--to", str(target))
    assert "larger than" in one_error_line(m.run) and m.run.code == 3
    assert m.peak_mib < PEAK_MIB
    assert list(target.iterdir()) == []  # nothing left behind


def test_decompression_bomb_chunk_is_refused_before_decoding(
    cli: Cli, tmp_path: Path, make_vm: Any
) -> None:
    """A chunk whose zstd frame claims 2 GiB: zstandard would allocate what the frame claims
    (max_output_size does not apply to frames that record their size)."""
    repo = tmp_path / "plain"
    cli("init", str(repo), "--encryption", "none", "--format", "1")  # a chunk object's frame
    point = _backup(cli, make_vm(), repo)
    chunk = _one_chunk(repo)
    bomb = io.BytesIO()
    writer = zstandard.ZstdCompressor(level=1).stream_writer(bomb, size=2 << 30, closefd=False)
    zeros = bytes(1 << 24)
    for _ in range(128):
        writer.write(zeros)
    writer.close()
    head = chunk.read_bytes()[:HEADER_SIZE]
    chunk.write_bytes(head[:5] + b"\x01" + head[6:] + bomb.getvalue())
    m = measured(cli, "verify", "--remote", str(repo), "--json")
    assert m.run.code == 3, m.run.err
    assert "decompress to 2147483648 bytes" in json.dumps(json.loads(m.run.out))
    assert m.peak_mib < PEAK_MIB
    target = tmp_path / "target"
    target.mkdir()
    m = measured(cli, "restore", point, "--remote", str(repo), "--to", str(target))
    assert "decompress" in one_error_line(m.run)
    assert m.peak_mib < PEAK_MIB


def test_huge_manifest_is_listed_as_a_problem(cli: Cli, repo_dir: Path, make_vm: Any) -> None:
    point = _backup(cli, make_vm(), repo_dir)
    sparse(repo_dir / "manifests" / point, HUGE)
    m = measured(cli, "list", "--remote", str(repo_dir), "--json")
    assert m.peak_mib < PEAK_MIB and m.seconds < 60
    out = json.loads(m.run.out)
    assert out["restore_points"] == []
    assert [p["point_id"] for p in out["unreadable"]] == [point], out
    assert "larger than" in out["unreadable"][0]["error"]
    m = measured(cli, "verify", "--remote", str(repo_dir))
    assert m.run.code == 3 and m.peak_mib < PEAK_MIB


def test_huge_lock_does_not_block_or_exhaust(cli: Cli, repo_dir: Path, make_vm: Any) -> None:
    """An oversized lock is unreadable, hence stale: backups go on, in bounded memory."""
    locks = repo_dir / "locks"
    locks.mkdir(exist_ok=True)
    sparse(locks / "exclusive-0123456789abcdef", HUGE)
    m = measured(cli, "backup", str(make_vm()), "--remote", str(repo_dir), "--json")
    assert m.run.code == 0, m.run.err
    assert m.peak_mib < PEAK_MIB


def test_passphrase_file_that_never_ends(cli: Cli, repo_dir: Path) -> None:
    env_free = dict(cli.env)
    env_free.pop("VMKEEP_PASSPHRASE")
    cli.env = env_free
    m = measured(cli, "--passphrase-file", "/dev/zero", "list", "--remote", str(repo_dir))
    assert "passphrase file" in one_error_line(m.run) and m.run.code == 2
    assert m.peak_mib < PEAK_MIB
    big = repo_dir.parent / "pass"
    big.write_bytes(b"x" * 4097)
    m = measured(cli, "--passphrase-file", str(big), "list", "--remote", str(repo_dir))
    assert "larger than 4096" in one_error_line(m.run)
