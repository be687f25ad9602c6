"""`vmkeep mirror` reports what it fetched from the source as stored bytes, apart from the
plaintext those chunks decode to: a sparse disk whose 4 MiB chunks each hold one 64 KiB
block of data (format 3: zero blocks are not stored) fetches its blocks and recipes (the
source's own index entries, summed), not the chunks' 4 MiB each (which `read` showed)."""

from __future__ import annotations

import random
from pathlib import Path

from tests.vm_dirs import write_raw_vm_json
from vmkeep.interfaces.cli.output import human_bytes
from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE

from .conftest import Cli, open_as_cli

KiB, MiB = 1 << 10, 1 << 20
CHUNKS = 6
TARGET = {"VMKEEP_TARGET_PASSPHRASE": "another passphrase"}


def sparse_vm(root: Path) -> Path:
    """CHUNKS chunks of 4 MiB, each one random 64 KiB block in zeros, then a 1 GiB hole."""
    vm = root / "sparse"
    vm.mkdir(parents=True)
    rng = random.Random(8)
    with open(vm / "disk0.img", "wb") as f:
        f.truncate(CHUNKS * 4 * MiB + 1024 * MiB)
        for k in range(CHUNKS):
            f.seek(k * 4 * MiB + (k % 4) * 1024 * KiB)
            f.write(rng.randbytes(64 * KiB))
    write_raw_vm_json(vm, "sparse", rng)
    return vm


def stored_bytes(cli: Cli, repo: str, point: str) -> int:
    """The source's encoded recipes and blocks of the point, from its own index."""
    with open_as_cli(cli, repo) as source:
        assert source.packed is not None
        index = source.packed.index()
        total = 0
        for _, chunk_id in source.load_manifest(point).disks[0].entries():
            recipe = index.get(KIND_RECIPE, chunk_id)
            assert recipe is not None
            total += recipe.length
            for block in set(source.packed.recipe_of(chunk_id)[1]) - {bytes(32)}:
                entry = index.get(KIND_BLOCK, block)
                assert entry is not None
                total += entry.length
        return total


def test_mirror_reports_bytes_fetched_apart_from_plaintext(cli: Cli, tmp_path: Path) -> None:
    source, target = str(tmp_path / "src"), str(tmp_path / "dst")
    cli("init", source)  # format 3, 4 MiB chunks, 64 KiB blocks
    cli("init", target, env={"VMKEEP_PASSPHRASE": TARGET["VMKEEP_TARGET_PASSPHRASE"]})
    vm = sparse_vm(tmp_path / "vms")
    point = cli("backup", str(vm), "-r", source, "--json").json()["restore_point"]
    out = cli("mirror", source, target, "--json", env=TARGET).json()
    (row,) = out["points"]
    assert row["status"] == "copied" and row["chunks"] == CHUNKS
    assert row["bytes_plaintext"] == CHUNKS * 4 * MiB  # the chunks, zeros included
    fetched = stored_bytes(cli, source, point)
    assert CHUNKS * 64 * KiB < fetched < CHUNKS * 80 * KiB  # blocks (random: as is), recipes
    assert row["bytes_fetched"] == fetched
    assert {k: out["totals"][k] for k in ("bytes_fetched", "bytes_plaintext")} == {
        "bytes_fetched": fetched,
        "bytes_plaintext": CHUNKS * 4 * MiB,
    }
    assert "bytes_read" not in row  # the old, ambiguous name

    target2 = str(tmp_path / "dst2")
    cli("init", target2, env={"VMKEEP_PASSPHRASE": TARGET["VMKEEP_TARGET_PASSPHRASE"]})
    run = cli("mirror", source, target2, env=TARGET)
    line = f"fetched {human_bytes(fetched)} from the source (24.0 MiB of plaintext, zeros"
    assert line in " ".join((run.out + run.err).split()), run.out + run.err
