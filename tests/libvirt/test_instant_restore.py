"""`vmkeep restore --instant` (libvirt): the new domain runs while its disk still reads from
vmkeep's NBD export, the throttled block-stream job then copies the point into the volume,
the volume ends standalone (no backing file) and byte-equal to the point, the export's
socket is gone; timed next to a full restore followed by a start (docs/MOUNT-EXPORT.md §5)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.e2e.conftest import VMKEEP, Cli
from tests.libvirt import libvirt_env as lv
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.test_restore import remove_domain

MiB = 1024 * 1024


def disk_backing(dom: object, target: str = "vda") -> ET.Element | None:
    root = ET.fromstring(dom.XMLDesc(0))  # type: ignore[attr-defined]
    for disk in root.iterfind("./devices/disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            backing = disk.find("backingStore")
            return backing.find("source") if backing is not None else None
    return None


def test_instant_restore_runs_first_then_copies(
    libvirt_env: LibvirtEnv, tmp_path: Path, lv_timings: dict[str, float]
) -> None:
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    d = lv.TestDomain(libvirt_env.conn, libvirt_env.pool, (16 * MiB,))
    copy, full = lv.unique_name("instant"), lv.unique_name("full")
    try:
        d.guest_write("vda", 0, os.urandom(3 * MiB))
        d.guest_write("vda", 9 * MiB, os.urandom(MiB))
        args = ("--connector", "libvirt", "--remote", str(repo), "--json")
        point = cli("backup", d.name, *args).json()["restore_point"]
        raw = tmp_path / "point.raw"
        cli("export", point, "vda", str(raw), "--remote", str(repo))
        pool = libvirt_env.pool.name
        cmd = [VMKEEP, "restore", point, "--connector", "libvirt", "--instant", "--to", pool,
               "--name", copy, "--bandwidth", "2", "--remote", str(repo)]  # fmt: skip
        began = time.monotonic()
        proc = subprocess.Popen(cmd, env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)  # fmt: skip
        assert proc.stderr is not None  # the CLI's messages go to stderr
        line = ""
        while f"domain {copy} running" not in line and proc.poll() is None:
            line = proc.stderr.readline()
        to_running = time.monotonic() - began
        assert f"domain {copy} running" in line, line + proc.communicate(timeout=120)[1]
        dom = libvirt_env.conn.lookupByName(copy)
        assert dom.isActive()
        source = disk_backing(dom)  # still on the export while copying at 2 MiB/s
        assert source is not None and source.get("protocol") == "nbd"
        socket_path = Path(source.find("host").get("socket"))  # type: ignore[union-attr]
        assert socket_path.is_socket()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        total = time.monotonic() - began
        assert dom.isActive() and disk_backing(dom) is None  # pivoted: standalone volume
        assert not socket_path.exists() and not socket_path.parent.exists()
        import libvirt

        source_el = ET.fromstring(dom.XMLDesc(0)).find("./devices/disk/source")
        assert source_el is not None
        volume = source_el.get("file", "")
        dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)  # QEMU flushes, closes the image
        qemu_info = ["qemu-img", "info", "--output=json", volume]
        info = json.loads(subprocess.run(qemu_info, capture_output=True, check=True).stdout)
        assert "backing-filename" not in info
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", volume, str(raw)],
            capture_output=True,
            text=True,
        )
        assert compare.returncode == 0, compare.stdout + compare.stderr
        # next to a full restore followed by a start
        t0 = time.monotonic()
        cli("restore", point, "--connector", "libvirt", "--to", pool,
            "--name", full, "--remote", str(repo))  # fmt: skip
        libvirt_env.conn.lookupByName(full).create()
        lv_timings["instant_to_running_s"] = to_running
        lv_timings["instant_total_s_at_2MiBps"] = total
        lv_timings["full_restore_then_start_s"] = time.monotonic() - t0
    finally:
        remove_domain(libvirt_env, copy)
        remove_domain(libvirt_env, full)
        d.destroy()


def test_instant_restore_refusals_leave_nothing(libvirt_env: LibvirtEnv, tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    d = lv.TestDomain(libvirt_env.conn, libvirt_env.pool, (8 * MiB,))
    name = lv.unique_name("refused")
    try:
        args = ("--connector", "libvirt", "--remote", str(repo), "--json")
        point = cli("backup", d.name, *args).json()["restore_point"]
        run = cli("restore", point, "--instant", "--remote", str(repo), ok=False)
        assert "needs --connector libvirt" in run.err and run.code == 2
        before = sorted(v.name() for v in libvirt_env.pool.pool.listAllVolumes(0))
        run = cli(
            "restore", point, "--connector", "libvirt", "--instant", "--to", "no-such-pool",
            "--name", name, "--remote", str(repo), ok=False,
        )  # fmt: skip
        assert "no libvirt storage pool 'no-such-pool'" in run.err and run.code not in (0, 70)
        assert name not in {dom.name() for dom in libvirt_env.conn.listAllDomains(0)}
        libvirt_env.pool.pool.refresh(0)
        assert sorted(v.name() for v in libvirt_env.pool.pool.listAllVolumes(0)) == before
    finally:
        remove_domain(libvirt_env, name)
        d.destroy()


def test_a_killed_instant_restore_is_finished_by_a_rerun(
    libvirt_env: LibvirtEnv, tmp_path: Path
) -> None:
    """vmkeep is SIGKILLed mid-copy after the guest wrote to its disk; the rerun refuses while
    the domain runs (its export is gone), refuses another point, then, once the domain is off,
    serves the point again and finishes: the volume is the point plus the guest's write."""
    import libvirt_qemu

    import libvirt

    cli = Cli(tmp_path)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    d = lv.TestDomain(libvirt_env.conn, libvirt_env.pool, (16 * MiB,))
    name = lv.unique_name("resumed")
    try:
        d.guest_write("vda", 0, os.urandom(3 * MiB))
        args = ("--connector", "libvirt", "--remote", str(repo), "--json")
        point = cli("backup", d.name, *args).json()["restore_point"]
        d.guest_write("vda", MiB, os.urandom(4096))
        other = cli("backup", d.name, *args).json()["restore_point"]
        raw = tmp_path / "point.raw"
        cli("export", point, "vda", str(raw), "--remote", str(repo))
        restore = ("restore", point, "--connector", "libvirt", "--instant", "--to",
                   libvirt_env.pool.name, "--name", name, "--remote", str(repo))  # fmt: skip
        proc = subprocess.Popen(
            [VMKEEP, *restore, "--bandwidth", "1"],
            env=cli.env,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stderr is not None
        line = ""
        while "running after" not in line and proc.poll() is None:
            line = proc.stderr.readline()
        dom = libvirt_env.conn.lookupByName(name)
        write = 'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0x5a 12M 64k"'
        libvirt_qemu.qemuMonitorCommand(
            dom, write, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
        time.sleep(1)
        proc.kill()  # SIGKILL: no clean-up at all
        proc.communicate(timeout=30)
        assert dom.isActive() and disk_backing(dom) is not None
        run = cli(*restore, ok=False)
        assert "power it off" in run.err and run.code not in (0, 70)
        dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        wrong = ("restore", other, *restore[2:])
        run = cli(*wrong, ok=False)
        assert "another point" in run.err and run.code not in (0, 70)
        out = cli(*restore, "--bandwidth", "0", "--json").json()
        assert out["name"] == name and dom.isActive() and disk_backing(dom) is None
        dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        volume = out["disks"]["vda"]
        converted = tmp_path / "volume.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", volume, str(converted)], check=True)
        expected = bytearray(raw.read_bytes())
        expected[12 * MiB : 12 * MiB + 65536] = b"\x5a" * 65536  # the guest's write survived
        assert converted.read_bytes() == bytes(expected)
    finally:
        remove_domain(libvirt_env, name)
        d.destroy()
