"""A repository written by an attacker: restores never write outside the requested target."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import DEFAULT_CHUNK_SIZE
from vmkeep.repository.manifest import DiskIndex, Manifest, new_point_id
from vmkeep.repository.repository import Repository

from .conftest import PASSPHRASE, Cli


def _hostile_point(repo_dir: Path, vm_name: str, disk_name: str, extra: dict[str, str]) -> str:
    repo = Repository.open(LocalRemote(repo_dir), lambda: PASSPHRASE.encode())
    data = os.urandom(DEFAULT_CHUNK_SIZE)
    chunk_id = repo.chunk_id(data)
    repo.put_chunk(chunk_id, data, 3)
    now = datetime.now(UTC)
    manifest = Manifest(
        id=new_point_id(now),
        vm={
            "name": vm_name,
            "uuid": str(uuid.uuid4()),
            "vcpus": 1,
            "memory": 1 << 30,
            "metadata": {},
            "connector": "files",
        },
        disks=[DiskIndex(disk_name, DEFAULT_CHUNK_SIZE, "raw", chunk_id, extra)],
        mode="full",
        created=now,
        finished=now,
    )
    repo.save_manifest(manifest)
    return manifest.id


def test_hostile_names_stay_inside_the_target(cli: Cli, repo_dir: Path, tmp_path: Path) -> None:
    bait = tmp_path / "outside"
    bait.mkdir()
    escape = f"../../outside/evil-{uuid.uuid4().hex[:6]}"
    point = _hostile_point(repo_dir, "../outside/vm", escape, {"file": "/etc/vmkeep-evil"})
    target = tmp_path / "target" / "deep"
    run = cli("restore", point, "--remote", str(repo_dir), "--to", str(target), ok=False)
    assert "name" in run.err  # the VM name is refused, not used as a path
    out = cli(
        "restore", point, "--remote", str(repo_dir), "--to", str(target), "--name", "ok", "--json"
    ).json()
    restored = Path(out["location"]).resolve()
    assert restored.parent == target.resolve()
    files = [p for p in restored.rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(restored) for p in files)
    assert sum(p.stat().st_size for p in files if p.name != "vm.json") == DEFAULT_CHUNK_SIZE
    assert list(bait.iterdir()) == [] and not Path("/etc/vmkeep-evil").exists()
