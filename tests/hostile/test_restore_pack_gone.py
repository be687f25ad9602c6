"""A data pack gone from an object store under a format 3 restore (restore_groups.py reads
the packs in the order of their IDs, so the last one is fetched last, while the first ones'
chunks are being written): one `error:` line, an exit status that is neither 0 nor the
internal error's, and no VM left in the target. Real SeaweedFS and Azurite through the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, remote_as_cli
from tests.e2e.test_remotes_cli import SERVERS

MiB = 1 << 20
PACKS_DATA = 4 * 16 * MiB  # random data: four data packs of 16 MiB


def _vm(root: Path) -> Path:
    vm = root / "vms" / "big"
    vm.mkdir(parents=True)
    (vm / "disk0.img").write_bytes(os.urandom(PACKS_DATA))
    config = {
        "name": "big",
        "uuid": "3f2a1c9e-0000-4000-8000-0000000000aa",
        "vcpus": 1,
        "memory_mib": 64,
        "disks": [{"name": "d0", "file": "disk0.img", "format": "raw"}],
        "metadata": {},
    }
    (vm / "vm.json").write_text(json.dumps(config))
    return vm


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_a_pack_gone_mid_restore_is_one_error_line_and_no_vm(
    kind: str, cli: Cli, tmp_path: Path
) -> None:
    servers = SERVERS[kind]()
    url, env = next(servers)
    cli.env.update(env)
    try:
        cli("remote", "add", "far", url)
        point = cli("backup", str(_vm(tmp_path)), "--json").json()["restore_point"]
        remote = remote_as_cli(cli, url)
        data = sorted(o.name for o in remote.list("packs/") if o.size > MiB)
        assert len(data) >= 4  # a format 3 repository (the default), one pack per 16 MiB
        remote.delete(data[-1])  # the last read
        target = tmp_path / "restored"
        target.mkdir()
        run = cli("restore", point, "--to", str(target), ok=False)
    finally:
        next(servers, None)
    assert run.code not in (0, 70)
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "is gone" in lines[0], run.err
    assert list(target.iterdir()) == []  # no VM, no half-written disk
