"""Faults on the real remotes, through the real `vmkeep` command, each server on loopback.

- S3: SeaweedFS killed (SIGKILL) in the middle of a backup, then restarted on the same ports and
  data directory: the run fails cleanly and soon, nothing half-done is listed, the repository
  verifies, the next backup succeeds and restores, gc runs.
- SMB: a wrong password is reported as an authentication failure.
- S3: a missing bucket is reported as such (and not created).
- Azure: Azurite stopped and restarted (same port, same --location) while a restore fetches
  chunks: the restore retries and completes, or fails clearly and leaves nothing in the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from tests.e2e.conftest import VMKEEP, Cli, disk_hashes
from tests.e2e.test_faults import random_vm
from tests.remotes import azure_server, s3_server, smb_server
from tests.remotes.azure_server import AzuriteServer
from tests.remotes.s3_server import SeaweedServer, started_or_skip
from tests.remotes.smb_server import SambaServer

BIG = 256 << 20  # random data: a backup or restore of it takes a few seconds on loopback


def error_line(stderr: str) -> str:
    """The run's stderr is exactly one line, an `error:` line, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    return lines[0]


def popen(cli: Cli, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [VMKEEP, *args],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def raw(cli: Cli, *args: str) -> subprocess.CompletedProcess[str]:
    """A run whose failure may not end with an `error:` line (which `Cli` would insist on)."""
    proc = subprocess.run(
        [VMKEEP, *args],
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def allocated(directory: Path) -> int:
    """Bytes the files under `directory` occupy on disk (what vanishes meanwhile counts 0)."""
    total = 0
    for parent, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


# -- S3 ------------------------------------------------------------------------------------------


class RestartableSeaweed(SeaweedServer):
    """SeaweedServer whose restart keeps its ports (hence its endpoint), keys and data directory;
    `kill` is a SIGKILL, as a crash or an OOM kill would be."""

    ports: list[int] | None = None

    def start(self, buckets: tuple[str, ...] = (), lock_buckets: tuple[str, ...] = ()) -> None:
        if self.ports is None:
            self.ports = s3_server.free_ports(10)
        ports = list(self.ports)
        with mock.patch.object(s3_server, "free_ports", lambda count: ports[:count]):
            super().start(buckets, lock_buckets)

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        assert proc is not None and proc.poll() is None, "weed is not running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


BUCKET = "vmkeep"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableSeaweed]:
    server = RestartableSeaweed(tmp_path_factory.mktemp("seaweed"))
    with started_or_skip(server, (BUCKET,)):
        yield server


def s3_cli(server: SeaweedServer, home: Path) -> Cli:
    cli = Cli(home)
    cli.env.update(
        AWS_ACCESS_KEY_ID=server.access_key,
        AWS_SECRET_ACCESS_KEY=server.secret_key,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return cli


def s3_url(server: SeaweedServer, bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}?endpoint={server.endpoint}&region=us-east-1&path_style=1"


def test_s3_server_killed_mid_backup(s3: RestartableSeaweed, tmp_path: Path) -> None:
    cli = s3_cli(s3, tmp_path)
    prefix = f"killed-{uuid.uuid4().hex[:8]}"
    url = s3_url(s3, BUCKET, prefix)
    cli("init", url, "--format", "1")  # the kill waits for 8 chunk objects
    vm = random_vm(tmp_path, "big", BIG, 41)
    expected = disk_hashes(vm)
    client = s3.client()

    def chunks_written() -> int:
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/chunks/", MaxKeys=100)
        return int(listed.get("KeyCount", 0))

    backup = popen(cli, "backup", str(vm), "--remote", url)
    try:
        deadline = time.monotonic() + 60
        while chunks_written() < 8 and backup.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backup.poll() is None, "the backup ended before the server could be killed"
        assert chunks_written() >= 8, "the backup wrote no chunks within 60 s"
        s3.kill()
        killed = time.monotonic()
        try:
            _, err = backup.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the backup still ran 60 s after its S3 server died")
        took = time.monotonic() - killed
    finally:
        stop(backup)
        if s3.proc is None:
            s3.start((BUCKET,))  # the same endpoint and data: later tests find it back
    assert backup.returncode != 0
    line = error_line(err)
    print(f"\nS3 killed mid-backup: exit {backup.returncode} after {took:.1f} s: {line}")
    assert took < 60

    listed = cli("list", "--remote", url, "--json").json()
    assert listed["restore_points"] == [] and listed["unreadable"] == []
    assert cli("verify", "--remote", url, "--json").json()["ok"]
    point = cli("backup", str(vm), "--remote", url, "--json").json()["restore_point"]
    points = cli("list", "--remote", url, "--json").json()["restore_points"]
    assert [p["restore_point"] for p in points] == [point]
    out = cli("restore", point, "--remote", url, "--to", str(tmp_path / "r"), "--json").json()
    assert disk_hashes(Path(out["location"])) == expected
    gc = cli("gc", "--remote", url, "--json").json()
    print(f"gc after the recovery: {gc}")
    assert gc["stale_locks_removed"] <= 1  # at most the dead run's own lock
    assert cli("verify", "--remote", url, "--json").json()["ok"]

    assert "cannot reach S3 endpoint" in line and s3.endpoint in line
    # what the request that met the dead server was doing: storing a chunk, or the stat that
    # comes before a chunk new to the VM is stored (whichever of the workers was first)
    assert "writing chunks/" in line or "reading chunks/" in line, line


def test_s3_bucket_missing(s3: RestartableSeaweed, tmp_path: Path) -> None:
    from botocore.exceptions import ClientError

    cli = s3_cli(s3, tmp_path)
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    url = s3_url(s3, bucket, "repo")
    for args in (["init", url], ["list", "--remote", url]):
        began = time.monotonic()
        line = error_line(cli(*args, ok=False, timeout=60).err)
        print(f"\nS3 bucket missing, vmkeep {args[0]}: {line}")
        assert f"bucket '{bucket}'" in line and line.endswith("does not exist")
        assert time.monotonic() - began < 15  # not retried as if transient
    with pytest.raises(ClientError):
        s3.client().head_bucket(Bucket=bucket)  # and it was not created behind our back

    # `remote test` reports its checks: each failed one gives the same diagnosis.
    began = time.monotonic()
    report = raw(cli, "remote", "test", url, "--size", "1", "--json")
    assert time.monotonic() - began < 15
    assert report.returncode == 1
    doc = json.loads(report.stdout)
    assert doc["ok"] is False and doc["checks"]
    for check, result in doc["checks"].items():
        print(f"S3 bucket missing, vmkeep remote test --json: {check}: {result}")
        assert f"bucket '{bucket}'" in result and result.endswith("does not exist")
    text = raw(cli, "remote", "test", url, "--size", "1")
    assert text.returncode == 1
    assert f"bucket '{bucket}'" in text.stdout and "does not exist" in text.stdout
    line = error_line(text.stderr)
    assert f"bucket '{bucket}'" in line and "does not exist" in line


# -- SMB -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smb() -> Iterator[SambaServer]:
    server = SambaServer()
    try:
        server.start()
    except smb_server.ServerUnavailable as exc:
        server.cleanup()
        pytest.skip(f"no Samba server: {exc}")
    yield server
    server.cleanup()


def test_smb_wrong_password(smb: SambaServer, tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    url = smb.url(f"repo-{uuid.uuid4().hex[:8]}")
    cli("init", url, env={"VMKEEP_SMB_PASSWORD": smb.password})  # a repository to be refused
    wrong = {"VMKEEP_SMB_PASSWORD": "not-" + smb.password}
    for args in (["remote", "test", url, "--size", "1"], ["list", "--remote", url]):
        began = time.monotonic()
        run = cli(*args, ok=False, env=wrong, timeout=60)
        line = error_line(run.err)
        print(f"\nSMB wrong password, vmkeep {' '.join(args[:2])}: {line}")
        assert "authentication" in line.lower() and smb.user in line
        assert time.monotonic() - began < 15  # not retried as if transient
    assert (
        cli("list", "--remote", url, "--json", env={"VMKEEP_SMB_PASSWORD": smb.password}).json()[
            "restore_points"
        ]
        == []
    )


# -- Azure ---------------------------------------------------------------------------------------


CONTAINER = "faults"


@pytest.fixture(scope="module")
def azurite() -> Iterator[AzuriteServer]:
    from azure.storage.blob import BlobServiceClient

    try:
        server = azure_server.start_azurite()  # persistent: --location is a directory
    except azure_server.ServerUnavailable as exc:
        pytest.skip(f"no Azurite: {exc}")
    try:
        BlobServiceClient.from_connection_string(server.connection_string).create_container(
            CONTAINER
        )
        yield server
    finally:
        azure_server.stop_azurite(server)


def test_azurite_restarted_mid_restore(azurite: AzuriteServer, tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    cli.env["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string
    url = f"azure://{CONTAINER}/repo-{uuid.uuid4().hex[:8]}?account=devstoreaccount1&endpoint={azurite.endpoint}"
    cli("init", url)
    vm = random_vm(tmp_path, "big", BIG, 42)
    expected = disk_hashes(vm)
    point = cli("backup", str(vm), "--remote", url, "--json").json()["restore_point"]
    target = tmp_path / "target"
    target.mkdir()
    port, location = azurite.port, azurite.workdir

    restore = popen(cli, "restore", point, "--remote", url, "--to", str(target), "--json")
    try:
        deadline = time.monotonic() + 60
        while (  # the hidden VM directory holds a few fetched chunks: well into the fetches
            not (list(target.glob(".vmkeep-new-*")) and allocated(target) >= 8 << 20)
            and restore.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        assert list(target.glob(".vmkeep-new-*")), "the restore did not start writing the VM"
        assert restore.poll() is None, "the restore ended before Azurite could be restarted"
        azurite.stop()
        stopped = time.monotonic()
        written = allocated(target)
        assert restore.poll() is None, "the restore ended before Azurite stopped"
        assert 0 < written < allocated(vm), "Azurite was not stopped while chunks were fetched"
        time.sleep(1.0)  # down long enough for requests to fail
        azurite.start()
        down = time.monotonic() - stopped
        assert (azurite.port, azurite.workdir) == (port, location)
        try:
            out, err = restore.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the restore still ran 120 s after Azurite came back")
    finally:
        stop(restore)
        if azurite.process is None:
            with contextlib.suppress(Exception):
                azurite.start()

    when = f"down {down:.1f} s, after {written >> 20} of {allocated(vm) >> 20} MiB were written"
    if restore.returncode == 0:
        # Outcome 1: the remote retried through the outage and the restore completed.
        location = Path(json.loads(out)["location"])
        assert location.parent == target
        assert disk_hashes(location) == expected
        assert os.listdir(target) == [location.name]  # no hidden half-built directory left
        print(f"\nAzurite restarted mid-restore ({when}): retried and completed")
    else:
        # Outcome 2: one clear line, and nothing half-restored in the target.
        line = error_line(err)
        assert os.listdir(target) == [], os.listdir(target)
        print(f"\nAzurite restarted mid-restore ({when}): failed: {line}")
    # Either way, the repository is whole and a restore now works.
    assert cli("verify", "--remote", url, "--json").json()["ok"]
    again = cli("restore", point, "--remote", url, "--to", str(tmp_path / "again"), "--json")
    assert disk_hashes(Path(again.json()["location"])) == expected
