"""End-to-end fixtures: the real `vmkeep` command, demo VMs, a repository on a local remote."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.stored_data import BOTH_FORMATS
from vmkeep.remotes.base import Remote
from vmkeep.remotes.location import credential_variables, open_remote
from vmkeep.repository.repository import Repository

VMKEEP = str(Path(sys.executable).with_name("vmkeep"))
PASSPHRASE = "e2e passphrase"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Cli:
    def __init__(self, home: Path) -> None:
        self.env = dict(
            os.environ,
            VMKEEP_CONFIG_DIR=str(home / "config"),
            VMKEEP_DATA_DIR=str(home / "data"),
            VMKEEP_CACHE_DIR=str(home / "cache"),
            VMKEEP_PASSPHRASE=PASSPHRASE,
            COLUMNS="200",
        )
        self.env.pop("VMKEEP_DEBUG", None)

    def __call__(
        self, *args: str, ok: bool = True, env: dict[str, str] | None = None, timeout: float = 600
    ) -> Run:
        proc = subprocess.run(
            [VMKEEP, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(self.env, **(env or {})),
            stdin=subprocess.DEVNULL,
        )
        run = Run(proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        if ok:
            assert proc.returncode == 0, f"vmkeep {' '.join(args)} failed: {proc.stderr}"
        else:
            assert proc.returncode != 0, f"vmkeep {' '.join(args)} should have failed"
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            assert lines and lines[-1].startswith("error:"), proc.stderr
        return run


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


# What vmkeep reads from the environment: remote credentials, its directories, the passphrase.
CLI_ENV_PREFIXES = ("AWS_", "AZURE_", "VMKEEP_")


@contextmanager
def cli_environment(cli: Cli) -> Iterator[None]:
    """`cli`'s remote credentials, directories and passphrase in os.environ while the block
    runs, for vmkeep code called in this process (remotes and the index cache read them
    there); the environment as it was afterwards."""
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in cli.env.items() if k.startswith(CLI_ENV_PREFIXES)})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def open_as_cli(cli: Cli, url: str) -> Iterator[Repository]:
    """The repository at `url` opened in this process as `cli`'s commands open it, usable
    while the block runs (inside cli_environment)."""
    with cli_environment(cli):
        yield Repository.open(open_remote(url), lambda: cli.env["VMKEEP_PASSPHRASE"].encode())


def remote_as_cli(cli: Cli, url: str) -> Remote:
    """The remote at `url` opened with `cli`'s credentials (given, not put in os.environ)."""
    names = credential_variables(url)
    return open_remote(url, {k: v for k, v in cli.env.items() if k in names})


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def vm_disks(vm_dir: Path) -> dict[str, Path]:
    doc = json.loads((vm_dir / "vm.json").read_text())
    return {d["name"]: vm_dir / d["file"] for d in doc["disks"]}


def disk_hashes(vm_dir: Path) -> dict[str, str]:
    """Guest-visible content: qcow2 disks are read through qemu-img so formats compare."""
    doc = json.loads((vm_dir / "vm.json").read_text())
    out = {}
    for d in doc["disks"]:
        path = vm_dir / d["file"]
        if d["format"] == "qcow2":
            raw = path.with_name(path.name + ".raw-for-hash")
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], check=True)
            out[d["name"]] = sha256(raw)
            raw.unlink()
        else:
            out[d["name"]] = sha256(path)
    return out


@pytest.fixture
def make_vm(tmp_path: Path) -> Callable[..., Path]:
    from vmkeep.connectors.files.demo import create_demo_vm

    def make(name: str = "web01", size: int = 64 * 1024 * 1024, fmt: str = "raw") -> Path:
        (tmp_path / "vms").mkdir(exist_ok=True)
        return Path(create_demo_vm(tmp_path / "vms", name, size, fmt))

    return make


@pytest.fixture
def repo_dir(tmp_path: Path, cli: Cli) -> Path:
    path = tmp_path / "repo"
    cli("init", str(path))
    return path


@pytest.fixture
def chunk_repo(tmp_path: Path, cli: Cli) -> Path:
    """A format 1 repository (one object per chunk under chunks/), whatever the default is:
    for tests that find, count or damage chunk objects by their chunk ID."""
    path = tmp_path / "repo"
    cli("init", str(path), "--format", "1")
    return path


@pytest.fixture(params=BOTH_FORMATS)
def any_repo(request: pytest.FixtureRequest, tmp_path: Path, cli: Cli) -> Path:
    """A repository of format 1, then 3: behaviour that must hold for either layout."""
    path = tmp_path / "repo"
    cli("init", str(path), "--format", request.param)
    return path
