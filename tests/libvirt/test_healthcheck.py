"""`vmkeep healthcheck` on a libvirt point: the real guest with qemu-guest-agent (real_guest.py)
is backed up live, its point is restored as a throw-away domain without network, booted under
TCG until its agent answers guest-ping, and removed: no vmkeep-hc-* domain or volume remains,
and a killed check's leftover volume is removed too."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.libvirt import libvirt_env as lv
from tests.libvirt import real_guest as rg
from tests.libvirt.conftest import LibvirtEnv

BOOT_TIMEOUT = 90.0
DISK = 64 * lv.MiB


@pytest.fixture
def guest(libvirt_env: LibvirtEnv) -> Iterator[rg.RealGuest]:
    try:
        files = rg.guest_files()
    except rg.GuestUnavailable as exc:
        pytest.skip(f"real guest cannot be built here: {exc}")
    g = rg.RealGuest(libvirt_env.conn, libvirt_env.pool, files, DISK)
    try:
        g.wait_ready(BOOT_TIMEOUT)
        yield g
    finally:
        g.destroy()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def leftovers(env: LibvirtEnv) -> list[str]:
    env.pool.pool.refresh(0)
    doms = [d.name() for d in env.conn.listAllDomains(0) if d.name().startswith("vmkeep-hc-")]
    vols = [v.name() for v in env.pool.pool.listAllVolumes(0) if v.name().startswith("vmkeep-hc-")]
    return doms + vols


def test_health_check_boots_the_point_and_its_agent_answers(
    libvirt_env: LibvirtEnv, guest: rg.RealGuest, tmp_path: Path
) -> None:
    cli = Cli(tmp_path)
    repo = str(tmp_path / "repo")
    cli("init", repo)
    point = cli("backup", guest.name, "--connector", "libvirt", "--remote", repo, "--json").json()[
        "restore_point"
    ]
    stale = f"vmkeep-hc-{dead_pid()}-0badc0de-vda.qcow2"  # a killed check's volume
    libvirt_env.pool.create_volume(stale, lv.MiB)
    t0 = time.monotonic()
    run = cli(
        "healthcheck",
        point,
        "--remote",
        repo,
        "--pool",
        libvirt_env.pool.name,
        "--timeout",
        "120",
        "--json",
    )
    took = time.monotonic() - t0
    result = run.json()
    assert result["status"] == "ok", result
    assert result["kind"] == "libvirt" and result["agent"] == "answered"
    assert {"restore", "start", "agent", "cleanup", "total"} <= set(result["durations"])
    assert result["durations"]["agent"] < 120
    assert any(stale in n for n in result["notes"]), result["notes"]
    assert leftovers(libvirt_env) == []
    assert guest.dom.isActive()  # the original was left alone
    guest.wait_written(2)
    print(f"health check took {took:.1f} s: {result['durations']}")
