"""`vmkeep job run` with a real `vmkeep server` on the same data directory: the CLI queues the
run in the ledger and the server runs it (its pid and host on the run, not the CLI's)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vmkeep.engine.serverlock import server_pid
from vmkeep.engine.state import Ledger, StateDB

from .conftest import VMKEEP, Cli, disk_hashes

JOB = """\
kind: backup
name: handed
remotes: [nas]
connector: {{type: files, root: {root}}}
vms: ["*"]
prune: false
"""


@contextmanager
def running_server(cli: Cli, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real `vmkeep server` on the test's data directory, up once it holds the lock."""
    with open(tmp_path / "server.log", "ab") as err:
        proc = subprocess.Popen(
            [VMKEEP, "server", "--tick", "0.2"],
            env=cli.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while server_pid(tmp_path / "data") != proc.pid:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_job_run_is_handed_to_the_server(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    vm = make_vm("web01", 32 << 20)
    cli("remote", "add", "nas", str(tmp_path / "nas"), "--chunk-size", "256K")
    (tmp_path / "job.yaml").write_text(JOB.format(root=vm.parent))
    cli("job", "apply", "-f", str(tmp_path / "job.yaml"))
    with running_server(cli, tmp_path) as proc:
        done = cli("job", "run", "handed", "--wait", "--json", timeout=120).json()
        assert done["state"] == "success", done
        assert [t["label"] for t in done["tasks"][0]["children"]] == ["web01"]

        queued = cli("job", "run", "handed", "--json").json()  # no --wait: queued, returns
        assert queued["state"] == "queued" and queued["server_pid"] == proc.pid
        second = cli("job", "run", "handed").out.strip()  # the bare run id
        assert second.isdigit() and int(second) == queued["id"] + 1

        db = StateDB.open(tmp_path / "data")
        try:
            ledger = Ledger(db)
            ids = (done["id"], queued["id"], int(second))
            deadline = time.monotonic() + 120
            while any(ledger.get_run(i).state in ("queued", "running") for i in ids):
                assert time.monotonic() < deadline, "handed-over runs did not end"
                time.sleep(0.2)
            ran = [ledger.get_run(i) for i in ids]
        finally:
            db.close()
        assert [r.state for r in ran] == ["success"] * 3
        assert {(r.pid, r.host, r.trigger) for r in ran} == {
            (proc.pid, socket.gethostname(), "manual")
        }
        # one run per job: the two queued runs did not overlap
        assert ran[1].finished is not None and ran[2].started is not None
        assert ran[1].finished <= ran[2].started

    points = cli("list", "--remote", "nas", "--json").json()["restore_points"]
    assert len(points) == 3
    cli("restore", points[-1]["restore_point"], "--remote", "nas", "--to", str(tmp_path / "r"))
    assert disk_hashes(tmp_path / "r" / "web01") == disk_hashes(vm)


def test_unknown_job_is_not_queued(cli: Cli, tmp_path: Path) -> None:
    cli("remote", "add", "nas", str(tmp_path / "nas"))
    with running_server(cli, tmp_path):
        err = cli("job", "run", "nope", ok=False).err
        assert "nope" in err and len(err.strip().splitlines()) == 1
        assert cli("run", "list", "--json").json() == []
