"""SIGKILL campaign on format 3: each command is killed at a random instant (uniform in
[0, its normal duration]) many times, and after every kill the repository must list only
complete points, verify (every referenced recipe and block read), restore hash-equal, take
the next backup and gc at once and hold no pack the index does not reference after gc.

    PYTHONPATH=src python bench/kill_campaign.py --remote local --kills 50
    PYTHONPATH=src python bench/kill_campaign.py --remote s3 --kills 15

Not a test (minutes, random): its findings became deterministic tests in
tests/e2e/test_format3_kills.py. Prints one line per kill and a summary per command."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

VMKEEP = str(Path(sys.executable).with_name("vmkeep"))
MiB = 1 << 20
COMMANDS = ("full", "delta", "gc", "repair", "prune", "migrate")


class Failure(Exception):
    pass


class Campaign:
    def __init__(self, root: Path, url: str, env: dict[str, str], seed: int, size: int) -> None:
        self.size = size  # MiB of disk
        self.in_work = False
        self.root, self.url, self.rng = root, url, random.Random(seed)
        self.env = dict(
            os.environ,
            VMKEEP_CONFIG_DIR=str(root / "config"),
            VMKEEP_DATA_DIR=str(root / "data"),
            VMKEEP_CACHE_DIR=str(root / "cache"),
            VMKEEP_PASSPHRASE="campaign",
            **env,
        )
        self.vm = root / "vm"
        self.points: dict[str, str] = {}  # point → sha256 of the disk it holds
        self.durations: dict[str, float] = {}
        self.restores = 0
        self.kills = 0

    # --- plumbing -------------------------------------------------------------------------
    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [VMKEEP, *args], env=self.env, capture_output=True, text=True, timeout=600
        )
        if "Traceback" in done.stderr or (ok and done.returncode != 0):
            raise Failure(f"vmkeep {' '.join(args)} → {done.returncode}: {done.stderr[-1500:]}")
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def make_vm(self) -> None:
        self.vm.mkdir()
        disk = self.vm / "disk0.img"
        with open(disk, "wb") as f:
            for _ in range(self.size * 3 // 4):
                f.write(self.rng.randbytes(MiB))
            f.truncate(self.size * MiB)
        doc = {
            "name": "victim",
            "uuid": str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            "vcpus": 1,
            "memory_mib": 256,
            "metadata": {},
            "disks": [{"name": "disk0", "file": "disk0.img", "format": "raw"}],
        }
        (self.vm / "vm.json").write_text(json.dumps(doc))

    def disk_hash(self) -> str:
        return hashlib.sha256((self.vm / "disk0.img").read_bytes()).hexdigest()

    def change(self, writes: int) -> None:
        """Scattered 64 KiB writes (random data): new blocks and recipes, old ones garbage."""
        with open(self.vm / "disk0.img", "r+b") as f:
            for _ in range(writes):
                f.seek(self.rng.randrange(0, (self.size * MiB - 65536) // 4096) * 4096)
                f.write(self.rng.randbytes(65536))

    def backup(self, mode: str = "delta", url: str | None = None) -> str:
        out = self.json("backup", str(self.vm), "--remote", url or self.url, "--mode", mode)
        point = str(out["restore_point"])
        if url is None:
            self.points[point] = self.disk_hash()
        return point

    def listed(self, url: str | None = None) -> list[str]:
        out = self.json("list", "--remote", url or self.url)
        return [str(p["restore_point"]) for p in out["restore_points"]]

    # --- checks ---------------------------------------------------------------------------
    def check(self, may_lose: bool, candidate: tuple[str, str] | None) -> list[str]:
        """After a kill: only complete points listed, verify reads everything, restores are
        exact. Returns the points to restore."""
        listed = self.listed()
        fresh = [p for p in listed if p not in self.points]
        if fresh:
            if candidate is None or len(fresh) > 1:
                raise Failure(f"unknown points listed: {fresh}")
            self.points[fresh[0]] = candidate[1]
        gone = [p for p in self.points if p not in listed]
        if gone and not may_lose:
            raise Failure(f"points no longer listed: {gone}")
        for p in gone:
            del self.points[p]
        if not self.json("verify", "--remote", self.url)["ok"]:
            raise Failure("verify failed after the kill")
        return fresh

    def restore(self, point: str) -> None:
        target = self.root / "restore"
        shutil.rmtree(target, ignore_errors=True)
        out = self.json("restore", point, "--remote", self.url, "--to", str(target))
        got = hashlib.sha256((Path(out["location"]) / "disk0.img").read_bytes()).hexdigest()
        if got != self.points[point]:
            raise Failure(f"restore of {point} differs")
        self.restores += 1
        shutil.rmtree(target, ignore_errors=True)

    def after(self, fresh: list[str]) -> None:
        """The next backup and gc run at once (stale locks); gc leaves no orphan pack."""
        began = time.monotonic()
        self.change(3)
        self.backup("delta")
        self.json("gc", "--remote", self.url)
        if time.monotonic() - began > 120:
            raise Failure("the next backup and gc took more than 120 s (a lock blocked them)")
        orphans = self.orphans()
        if orphans:
            raise Failure(f"after gc: {orphans}")
        # The next kill's check verifies what this gc left; an old point is restored now
        # and then (a restore costs as much as a verify).
        self.kills += 1
        extra = [self.rng.choice(list(self.points))] if self.kills % 4 == 0 else []
        for point in {*fresh, *extra}:
            self.restore(point)

    def final(self) -> None:
        if not self.json("verify", "--remote", self.url)["ok"]:
            raise Failure("verify failed at the end")
        for point in list(self.points):
            self.restore(point)

    def orphans(self) -> str:
        """Packs on the remote that no index entry names, index entries naming absent packs,
        and temporary objects: after a complete gc there must be none."""
        code = (
            "import json,sys\n"
            "from vmkeep.remotes.location import open_remote\n"
            "from vmkeep.repository.repository import Repository\n"
            "from vmkeep.repository.packs import pack_id_of_name\n"
            "remote = open_remote(sys.argv[1])\n"
            "repo = Repository.open(remote, lambda: b'campaign')\n"
            "names = [o.name for o in remote.list('packs/')]\n"
            "packs = {pack_id_of_name(n) for n in names}\n"
            "indexed = {e.pack for e in repo.packed.reload().index.entries()}\n"
            "other = [o.name for o in remote.list('') if not o.name.startswith("
            "('packs/', 'index/', 'manifests/', 'config', 'gc-epoch', 'locks/'))]\n"
            "print(json.dumps({'unindexed': len(packs - indexed), 'absent': len(indexed - packs),"
            " 'bad_names': sum(1 for p in packs if p is None), 'other': other[:5],"
            " 'packs': len(packs), 'locks': [o.name for o in remote.list('locks/')]}))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, self.url],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            return f"pack count failed: {done.stderr[-800:]}"
        counts = json.loads(done.stdout)
        self.last_packs = counts["packs"]
        bad = {k: v for k, v in counts.items() if k != "packs" and v}
        return json.dumps(bad) if bad else ""

    def kill_instant(self, proc: subprocess.Popen[bytes], duration: float) -> float:
        """Sleeps until the kill instant and returns it (seconds after the start): uniform
        in [0, duration]; with --in-work (local remotes), uniform over the rest of the
        duration once the process holds its lock, so the kill falls inside the work, not in
        the interpreter's start-up."""
        began = time.monotonic()
        if self.in_work and "://" not in self.url:
            locks = Path(self.url) / "locks"
            while proc.poll() is None and not (locks.is_dir() and any(locks.iterdir())):
                if time.monotonic() - began > 4 * duration + 5:
                    break
                time.sleep(0.005)
        held = time.monotonic() - began
        at = held + self.rng.uniform(0, max(0.05, duration - held))
        time.sleep(max(0.0, at - (time.monotonic() - began)))
        return at

    def holds_lock(self) -> bool:
        """Whether the dead process left its lock (local remotes; S3: not counted)."""
        locks = Path(self.url) / "locks"
        return "://" not in self.url and locks.is_dir() and any(locks.iterdir())

    # --- the killed commands --------------------------------------------------------------
    def prepare(self, command: str) -> tuple[list[str], bool, tuple[str, str] | None]:
        """Work for `command` to do; returns its arguments, whether it may drop points and
        the point it may add (id unknown yet, with its disk hash)."""
        if command in ("full", "delta"):
            self.change(40 if command == "delta" else 120)
            args = ["backup", str(self.vm), "--remote", self.url, "--mode", command]
            return args, False, ("?", self.disk_hash())
        if command == "gc":  # garbage in many packs: repack and consolidation work
            self.change(20)
            self.backup("delta")
            old = sorted(self.points)[: max(0, len(self.points) - 2)]
            for point in old[:2]:
                self.run("forget", point, "--remote", self.url)
                del self.points[point]
            return ["gc", "--remote", self.url], False, None
        if command == "repair":
            return ["repair", "index", "--remote", self.url], False, None
        if command == "prune":
            while len(self.points) < 4:
                self.change(4)
                self.backup("delta")
            return ["prune", "--remote", self.url, "--keep-last", "2"], True, None
        raise AssertionError(command)

    def timed(self, args: list[str]) -> float:
        began = time.monotonic()
        self.run(*args)
        return time.monotonic() - began

    def kill_once(self, command: str) -> str:
        args, may_lose, candidate = self.prepare(command)
        duration = self.durations.get(command)
        if duration is None:  # the first run of each command measures its normal duration
            self.durations[command] = self.timed(args)
            self.after(self.check(may_lose, candidate))
            args, may_lose, candidate = self.prepare(command)
            duration = self.durations[command]
        proc = subprocess.Popen(
            [VMKEEP, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        at = self.kill_instant(proc, duration)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        if b"Traceback" in err:
            raise Failure(f"traceback before the kill: {err[-1500:]!r}")
        outcome = "completed" if proc.returncode == 0 else "killed"
        if outcome == "killed" and self.holds_lock():
            outcome = "killed-holding-lock"  # inside the work, not start-up or exit
        fresh = self.check(may_lose, candidate)
        self.after(fresh)
        return f"{outcome} at {at:.2f}/{duration:.2f}s"


def kill_migrate(c: Campaign, source: str) -> str:
    """migrate into a fresh format 3 target, killed; the target then lists only copied
    points, verifies, a second migrate completes and a gc leaves no orphan."""
    name = f"m{c.rng.getrandbits(32):08x}"
    target = c.url.replace("/repo?", f"/{name}?") if "://" in c.url else str(c.root / name)
    c.run("init", target, "--format", "3", "--pack-size", "1M")
    duration = c.durations.setdefault("migrate", 0.0)
    if not duration:
        began = time.monotonic()
        c.run("migrate", source, target)
        c.durations["migrate"] = time.monotonic() - began
        return "measured"
    at = c.rng.uniform(0, duration)
    proc = subprocess.Popen(
        [VMKEEP, "migrate", source, target],
        env=c.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(at)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    if b"Traceback" in err:
        raise Failure(f"traceback: {err[-1500:]!r}")
    source_points = set(c.listed(source))
    listed = c.listed(target)
    if not set(listed) <= source_points:
        raise Failure(f"migrate target lists unknown points {set(listed) - source_points}")
    if not c.json("verify", "--remote", target)["ok"]:
        raise Failure("migrate target fails verify after the kill")
    c.run("migrate", source, target)
    if set(c.listed(target)) != source_points:
        raise Failure("second migrate did not copy every point")
    c.json("gc", "--remote", target)
    saved = c.url
    c.url = target
    try:
        orphans = c.orphans()
    finally:
        c.url = saved
    if orphans:
        raise Failure(f"migrate target after gc: {orphans}")
    if not c.json("verify", "--remote", target)["ok"]:
        raise Failure("migrate target fails verify after gc")
    return f"{'completed' if proc.returncode == 0 else 'killed'} at {at:.2f}/{duration:.2f}s"


@contextmanager
def s3_remote() -> Iterator[tuple[str, dict[str, str]]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.remotes.s3_server import SeaweedServer

    server = SeaweedServer(Path(tempfile.mkdtemp(prefix="vmkeep-kills-s3-")))
    server.start(("vmkeep",))
    try:
        url = f"s3://vmkeep/repo?endpoint={server.endpoint}&region=us-east-1&path_style=1"
        yield (
            url,
            {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key},
        )
    finally:
        server.stop()


def campaign(
    url: str,
    env: dict[str, str],
    root: Path,
    kills: int,
    commands: list[str],
    seed: int,
    size: int,
    in_work: bool = False,
) -> dict[str, Counter[str]]:
    c = Campaign(root, url, env, seed, size)
    c.in_work = in_work
    c.make_vm()
    c.run("init", url, "--format", "3", "--pack-size", "1M")
    c.backup("full")
    source = ""
    if "migrate" in commands:
        source = str(root / "v1") if "://" not in url else url.replace("/repo?", "/v1?")
        c.run("init", source, "--format", "1")
        for _ in range(3):
            c.change(30)
            c.backup("delta", url=source)
    results: dict[str, Counter[str]] = {}
    for command in commands:
        tally = results.setdefault(command, Counter())
        done = 0
        while done < kills:
            try:
                if command == "migrate":
                    line = kill_migrate(c, source)
                    if line == "measured":
                        continue
                else:
                    line = c.kill_once(command)
                tally[line.split()[0]] += 1
            except Failure as exc:
                tally["FAILED"] += 1
                line = f"FAILED: {exc}"
                print(f"{command} #{done}: {line}", flush=True)
                return results  # the repository state is the evidence: stop here
            done += 1
            print(f"{command} #{done}: {line}", flush=True)
        print(
            f"== {command}: {dict(tally)} (normal {c.durations.get(command, 0):.2f}s)", flush=True
        )
    c.final()
    print(f"restores checked: {c.restores}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--remote", choices=["local", "s3"], default="local")
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--commands", default=",".join(COMMANDS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--size-mib", type=int, default=16, help="the VM's disk")
    parser.add_argument("--in-work", action="store_true", help="kill only once the lock is held")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    a = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vmkeep-kills-"))
    commands = a.commands.split(",")
    try:
        if a.remote == "s3":
            with s3_remote() as (url, env):
                results = campaign(url, env, root, a.kills, commands, a.seed, a.size_mib, a.in_work)
        else:
            results = campaign(
                str(root / "repo"), {}, root, a.kills, commands, a.seed, a.size_mib, a.in_work
            )
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")
    print(json.dumps({k: dict(v) for k, v in results.items()}))


if __name__ == "__main__":
    main()
