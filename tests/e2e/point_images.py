"""A VM whose one raw disk has chosen data ranges and holes, backed up through the real CLI:
the restore point that the export, NBD and mount tests read back."""

from __future__ import annotations

import json
import random
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.vm_dirs import write_raw_vm_json

from .conftest import VMKEEP, Cli, sha256

KiB, MiB = 1 << 10, 1 << 20


@dataclass
class Point:
    repo: Path
    point: str
    raw: Path  # the raw restore of disk0 (`vmkeep export --format raw`)
    size: int
    data: list[tuple[int, int]]  # (offset, length) ranges with random data

    @property
    def digest(self) -> str:
        return sha256(self.raw)


def sparse_vm(root: Path, size: int, data: list[tuple[int, int]], seed: int = 1) -> Path:
    """A files-connector VM whose disk0 holds random bytes in `data` and holes elsewhere."""
    vm = root / f"vm{seed}"
    vm.mkdir(parents=True)
    rng = random.Random(seed)
    with open(vm / "disk0.img", "wb") as f:
        f.truncate(size)
        for offset, length in data:
            f.seek(offset)
            f.write(rng.randbytes(length))
    write_raw_vm_json(vm, vm.name, rng)
    return vm


def backed_up(
    cli: Cli, root: Path, size: int, data: list[tuple[int, int]], chunk: str = "1MiB"
) -> Point:
    """Back the VM up into a new repository (small chunks: more holes) and export its raw disk."""
    repo = root / "repo"
    cli("init", str(repo), "--encryption", "none", "--chunk-size", chunk)
    vm = sparse_vm(root / "vms", size, data)
    point = cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"]
    raw = root / "restored.raw"
    cli("export", point, "disk0", str(raw), "--format", "raw", "--remote", str(repo))
    assert sha256(raw) == sha256(vm / "disk0.img")
    return Point(repo, point, raw, size, data)


# Holes between data ranges, a range across a 2 MiB boundary, data in the short last 2 MiB.
ODD_SIZE = 13 * MiB + 7 * 512  # neither a multiple of 2 MiB nor of the 1 MiB chunk
ODD_DATA = [(0, 300 * KiB), (3 * MiB + 5 * KiB, 2 * MiB), (9 * MiB, 4 * KiB), (13 * MiB, 7 * 512)]


class Served:
    """A `vmkeep serve-nbd` process; `uri` is the address it printed first."""

    def __init__(self, cli: Cli, point: Point, *args: str) -> None:
        cmd = [VMKEEP, "serve-nbd", point.point, "disk0", "--remote", str(point.repo), "--json"]
        self.proc = subprocess.Popen(
            [*cmd, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=cli.env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, self.proc.communicate(timeout=30)[1]
        self.uri = str(json.loads(line)["uri"])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> tuple[int, str]:
        """Signal the server; its exit code and stderr once it is gone."""
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)
