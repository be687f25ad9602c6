"""A running libvirt domain backed up and restored through the `vmkeep` command."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests.e2e.conftest import Cli, disk_hashes
from tests.libvirt import libvirt_env as lv
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.test_restore import remove_domain

MiB = 1024 * 1024


def test_cli_full_and_delta_of_a_running_domain(libvirt_env: LibvirtEnv, tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    d = lv.TestDomain(libvirt_env.conn, libvirt_env.pool, (32 * MiB,))
    try:
        d.guest_write("vda", 0, os.urandom(3 * MiB))
        args = ("--connector", "libvirt", "--remote", str(repo), "--json")
        full = cli("backup", d.name, *args).json()
        full_model = bytes(d.disks[0].model)
        d.guest_write("vda", 20 * MiB, os.urandom(4096))
        delta = cli("backup", d.name, "--mode", "delta", *args).json()
        assert full["bytes_read"] == 3 * MiB and full["bytes_chunks"] == 4 * MiB, full
        # the one chunk written, of which only the written 64 KiB cluster is data
        assert delta["bytes_chunks"] == 4 * MiB and delta["bytes_read"] == 64 * 1024, delta
        for point, model in (
            (full["restore_point"], full_model),
            (delta["restore_point"], bytes(d.disks[0].model)),
        ):
            out = cli(
                "restore", point, "--remote", str(repo), "--to", str(tmp_path / point), "--json"
            ).json()
            restored = disk_hashes(Path(out["location"]))  # qcow2 read through qemu-img
            assert restored == {"vda": hashlib.sha256(model).hexdigest()}
        copy = lv.unique_name("cli-restore")
        try:
            out = cli(
                "restore",
                delta["restore_point"],
                "--connector",
                "libvirt",
                "--to",
                libvirt_env.pool.name,
                "--name",
                copy,
                "--remote",
                str(repo),
                "--json",
            ).json()
            assert out["location"] == copy
            dom = libvirt_env.conn.lookupByName(copy)
            assert not dom.isActive() and dom.UUIDString() != d.dom.UUIDString()
            (volume,) = (
                v
                for v in libvirt_env.pool.pool.listAllVolumes(0)
                if v.name().startswith(copy + "-")
            )
            raw = tmp_path / "restored.raw"
            subprocess.run(
                ["qemu-img", "convert", "-O", "raw", volume.path(), str(raw)], check=True
            )
            assert (
                hashlib.sha256(raw.read_bytes()).hexdigest()
                == hashlib.sha256(bytes(d.disks[0].model)).hexdigest()
            )
        finally:
            remove_domain(libvirt_env, copy)
        missing = cli("backup", "no-such-domain", *args, ok=False)
        assert "no-such-domain" in missing.err
    finally:
        d.destroy()
