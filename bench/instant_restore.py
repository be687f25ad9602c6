"""Instant restore benchmark: seconds from the command to a running domain with
`vmkeep restore --instant`, next to a full `vmkeep restore` followed by a start (issue 16).

    .venv/bin/python bench/instant_restore.py [--size-gib 2] [--json] [--keep]

A guest-less domain (TCG) gets a qcow2 disk prefilled with the core benchmark's image
(bench/image.py: half allocated, half of that real binaries) and is backed up live into an
encrypted local repository. Then, into a throw-away dir storage pool: (1) full restore as a
new domain, then `virDomainCreate`; (2) instant restore as another new domain, unthrottled
(`--bandwidth 0`), timed to its `running after` line and to the end of the copy. Both restored
volumes are compared with the source image (qemu-img compare). Needs root and libvirtd.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image import GiB, MiB, build_image
from libvirt_live import URI, remove_domain, running_domain

ROOT = Path("/var/lib/libvirt/images")
PASSPHRASE = "bench passphrase"


def vmkeep() -> str:
    return str(Path(sys.executable).with_name("vmkeep"))


def run(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def volume_of(conn: Any, name: str) -> str:
    import xml.etree.ElementTree as ET

    source = ET.fromstring(conn.lookupByName(name).XMLDesc(0)).find("./devices/disk/source")
    assert source is not None
    return source.get("file", "")


def same(volume: str, image: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", "-q", volume, str(image)]).returncode == 0


def measure(work: Path, size: int) -> dict[str, Any]:
    import libvirt

    raw, image = work / "prefill.raw", work / "vda.qcow2"
    build_image(str(raw), size, seed=16)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    env = dict(os.environ, VMKEEP_PASSPHRASE=PASSPHRASE, VMKEEP_CONFIG_DIR=f"{work}/config",
               VMKEEP_DATA_DIR=f"{work}/data")  # fmt: skip
    repo, pool_dir = work / "repo", work / "pool"
    pool_dir.mkdir()
    conn = libvirt.open(URI)
    pool_name = f"{work.name}-pool"
    pool = conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{pool_name}</name><target><path>{pool_dir}</path></target></pool>",
        0,
    )
    full, instant = f"{work.name}-full", f"{work.name}-instant"
    try:
        with running_domain(work.name, image):
            run([vmkeep(), "init", str(repo)], env)
            out = run([vmkeep(), "backup", work.name, "--connector", "libvirt", "--remote",
                       str(repo), "--json"], env)  # fmt: skip
        point = json.loads(out)["restore_point"]
        restore = [vmkeep(), "restore", point, "--connector", "libvirt", "--to", pool_name,
                   "--remote", str(repo)]  # fmt: skip
        t0 = time.perf_counter()
        run([*restore, "--name", full], env)
        conn.lookupByName(full).create()
        full_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        proc = subprocess.Popen([*restore, "--name", instant, "--instant", "--bandwidth", "0"],
                                env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stderr is not None
        line = ""
        while "running after" not in line and proc.poll() is None:
            line = proc.stderr.readline()
        to_running = time.perf_counter() - t0
        _, err = proc.communicate(timeout=3600)
        total = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"instant restore failed: {err.strip()[-500:]}")
        for name in (full, instant):
            conn.lookupByName(name).destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        ok = same(volume_of(conn, full), image) and same(volume_of(conn, instant), image)
    finally:
        for name in (full, instant):
            remove_domain(name)
        with suppress(libvirt.libvirtError):
            pool.destroy()
        conn.close()
    return {
        "size": size,
        "full_restore_then_start_s": full_seconds,
        "instant_to_running_s": to_running,
        "instant_copy_done_s": total,
        "to_running_ratio_full_over_instant": full_seconds / to_running,
        "same": ok,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (libvirt system URI)")
    work = ROOT / f"vmkeep-bench-{os.getpid()}-{secrets.token_hex(3)}"
    work.mkdir(mode=0o755)
    try:
        result = measure(work, int(args.size_gib * GiB) // MiB * MiB)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"disk {result['size'] / GiB:g} GiB, half allocated; volumes equal the source: "
              f"{result['same']}")  # fmt: skip
        print(f"full restore + start      {result['full_restore_then_start_s']:7.2f} s")
        print(f"instant: domain running   {result['instant_to_running_s']:7.2f} s  "
              f"({result['to_running_ratio_full_over_instant']:.1f}x sooner)")  # fmt: skip
        print(f"instant: copy finished    {result['instant_copy_done_s']:7.2f} s")
    return 0 if result["same"] else 1


if __name__ == "__main__":
    sys.exit(main())
