"""Shut-off domain over qemu+ssh://: vmkeep's offline full and delta backups against a plain
`ssh HOST cat IMAGE` of the same image file, in one run on the same data.

    .venv/bin/python bench/libvirt_remote_offline.py [--size-mib 1024] [--json]

Why `ssh cat`: whatever copies a shut-off VM's image from its host over ssh (scp, rsync of a
changed file, a file-level backup tool reading through sshfs) reads at least the whole file
through ssh each run; vmkeep reads the allocated extents, and from the second run only the
extents the checkpoint's bitmap marks (qemu-img and qemu-nbd run on the host, one ssh
connection per run: LIBVIRT-NOTES §16). The "remote host" is this one, reached through a
private sshd on 127.0.0.1 (tests/libvirt/ssh_transport.py), so the network is loopback and ssh's
encryption is the same as on a LAN.

Steps (page cache dropped before each): a guest-less domain with one qcow2 disk, half of it
written with random data, shut off; vmkeep full backup over the ssh URI; `ssh cat` of the
image; 1% of the disk rewritten in scattered 64 KiB blocks (qemu-io on the image, which the
recording bitmap tracks); vmkeep delta; `ssh cat` again; a vmkeep delta with nothing written.
The last point is restored and compared with the image (qemu-img compare). Root, libvirtd and
openssh-server needed (scripts/install-libvirt.sh installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from core import PASSPHRASE, Run, drop_caches, run, speaker

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 64 * 1024  # the size of each rewritten block
CHUNK = 4 << 20  # the repository's (default) chunk size


def _tests_on_path() -> None:
    """The real-server helpers (private sshd, test domains) live in the tests package."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def benchmark(size_mib: int, say: Any, seed: int = 1) -> dict[str, Any]:
    _tests_on_path()
    from tests.libvirt import libvirt_env as lv
    from tests.libvirt.backup_points import offline_write
    from tests.libvirt.ssh_transport import ssh_libvirt_uri

    import libvirt
    from vmkeep.connectors.libvirt.transport.ssh_nbd import SshTarget

    rng = random.Random(seed)
    size = size_mib << 20
    conn = libvirt.open(lv.URI)
    pool = lv.TestPool(conn, lv.unique_name("bench-remote"))
    dom = lv.TestDomain(conn, pool, (size,))
    work = Path(tempfile.mkdtemp(prefix="vmkeep-bench-remote-"))
    times: dict[str, Run] = {}
    try:
        say(f"writing {size_mib // 2} MiB of random data into a {size_mib} MiB disk")
        for off in range(0, size // 2, 32 << 20):
            dom.guest_write("vda", off, os.urandom(min(32 << 20, size // 2 - off)))
        dom.stop()
        image = str(dom.disk("vda").path)
        env = dict(os.environ, VMKEEP_PASSPHRASE=PASSPHRASE, VMKEEP_CONFIG_DIR=str(work / "cfg"))
        repo = str(work / "repo")
        vmkeep = str(Path(sys.executable).with_name("vmkeep"))
        step(times, "vmkeep init", [vmkeep, "init", repo], env, say, drop=False)
        (work / "sshd").mkdir()
        with ssh_libvirt_uri(work / "sshd") as uri:
            target = SshTarget.from_uri(uri)
            cat = target.argv(["cat", "--", image])
            args = ["--connector", "libvirt", "--uri", uri, "--remote", repo, "--json"]
            backup = [vmkeep, "backup", dom.name, *args]
            step(times, "vmkeep full", [*backup, "--mode", "full"], env, say)
            step(times, "ssh cat 1st", cat, env, say, capture=False)
            blocks = size // BLOCK
            changed = rng.sample(range(blocks), max(1, blocks // 100))
            for b in changed:
                offline_write(dom, "vda", b * BLOCK, rng.randrange(256), BLOCK)
            step(times, "vmkeep delta", [*backup, "--mode", "delta"], env, say)
            step(times, "ssh cat 2nd", cat, env, say, capture=False)
            step(times, "vmkeep no change", [*backup, "--mode", "delta"], env, say)
            point = json.loads(times["vmkeep no change"].stdout)["restore_point"]
        restored = work / "restored"
        step(times, "vmkeep restore", [vmkeep, "restore", point, "--remote", repo, "--to",
                                       str(restored), "--json"], env, say)  # fmt: skip
        (disk,) = [p for p in restored.rglob("*") if p.is_file() and p.name != "vm.json"]
        same = subprocess.run(["qemu-img", "compare", "-q", str(disk), image]).returncode == 0
        touched = len({b * BLOCK // CHUNK for b in changed})
        extra = {"changed_blocks": len(changed), "touched_chunks": touched}
        return report(times, size, same) | extra
    finally:
        dom.destroy()
        pool.destroy()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def step(
    times: dict[str, Run],
    label: str,
    argv: list[str],
    env: dict[str, str],
    say: Any,
    drop: bool = True,
    capture: bool = True,
) -> None:
    if drop:
        drop_caches()
    result = run(argv, env, capture=capture)
    if result.returncode != 0:
        raise RuntimeError(f"{label} failed: {result.stderr.strip()[-400:]}")
    times[label] = result
    say(f"{label}: {result.seconds:.2f} s")


def report(times: dict[str, Run], size: int, same: bool) -> dict[str, Any]:
    t = {k: v.seconds for k, v in times.items()}
    backups = ("vmkeep full", "vmkeep delta", "vmkeep no change")
    read = {k: json.loads(times[k].stdout)["bytes_read"] for k in backups}
    return {
        "disk_bytes": size,
        "seconds": {k: round(v, 3) for k, v in t.items()},
        "bytes_read": read,
        "full: ssh cat / vmkeep full": round(t["ssh cat 1st"] / t["vmkeep full"], 2),
        "delta: ssh cat / vmkeep delta": round(t["ssh cat 2nd"] / t["vmkeep delta"], 2),
        "no change: ssh cat / vmkeep": round(t["ssh cat 2nd"] / t["vmkeep no change"], 2),
        "restore of the last point == image": same,
    }


def print_report(result: dict[str, Any]) -> None:
    print(f"\nshut-off domain over qemu+ssh://127.0.0.1, {result['disk_bytes'] >> 20} MiB disk")
    for label, seconds in result["seconds"].items():
        read = result["bytes_read"].get(label)
        extra = f"  read {read >> 20} MiB" if read is not None else ""
        print(f"  {label:<18} {seconds:7.2f} s{extra}")
    for key in ("full: ssh cat / vmkeep full", "delta: ssh cat / vmkeep delta",
                "no change: ssh cat / vmkeep"):  # fmt: skip
        print(f"  {key}: {result[key]}x")
    same = result["restore of the last point == image"]
    print(f"  restore of the last point == image: {'OK' if same else 'DIFFERS'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vmkeep offline backups over qemu+ssh://")
    parser.add_argument("--size-mib", type=int, default=1024, help="disk size (default 1024)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = benchmark(args.size_mib, speaker(args.json), args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0 if result["restore of the last point == image"] else 1


if __name__ == "__main__":
    sys.exit(main())
