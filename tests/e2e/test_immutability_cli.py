"""Immutability through the real `vmkeep` and `vmkeep-immutable` commands: an S3 bucket with
Object Lock (SeaweedFS) and a local directory with `chattr +i`. Prune and gc keep what is
locked and say until when (text and --json), the old point still restores byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.immutable_files import immutable_vault
from tests.remotes.s3_server import REGION, SeaweedServer, started_or_skip
from vmkeep.connectors.files.demo import modify_demo_vm
from vmkeep.remotes.file_attributes import is_immutable

from .conftest import Cli, disk_hashes

HELPER = str(Path(sys.executable).with_name("vmkeep-immutable"))


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedServer]:
    with (
        tempfile.TemporaryDirectory(prefix="vmkeep-imm-e2e-", ignore_cleanup_errors=True) as work,
        started_or_skip(SeaweedServer(Path(work)), ("imm-plain",), ("imm-locked",)) as server,
    ):
        yield server


def s3_url(server: SeaweedServer, bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}?endpoint={server.endpoint}&region={REGION}&path_style=1"


def about_a_day_from_now(text: str | None) -> bool:
    assert text is not None
    until = datetime.fromisoformat(text)
    return timedelta(hours=23) < until - datetime.now(UTC) < timedelta(days=1, hours=7)


@pytest.mark.parametrize(("fmt", "data"), [("1", "chunks/"), ("3", "packs/")])
def test_s3_object_lock_end_to_end(
    cli: Cli,
    seaweed: SeaweedServer,
    make_vm: Callable[..., Path],
    tmp_path: Path,
    fmt: str,
    data: str,
) -> None:
    cli.env.update(
        AWS_ACCESS_KEY_ID=seaweed.access_key,
        AWS_SECRET_ACCESS_KEY=seaweed.secret_key,
        AWS_EC2_METADATA_DISABLED="true",
    )
    refused = cli(
        "remote", "add", "plain", s3_url(seaweed, "imm-plain", "r"), "--lock-days", "1", ok=False
    )
    assert "does not have Object Lock" in refused.err
    prefix = f"e2e{fmt}-{os.getpid()}"
    url = s3_url(seaweed, "imm-locked", prefix)
    cli("remote", "add", "vault", url, "--format", fmt, "--lock-days", "1")
    assert cli("remote", "list", "--json").json()[0]["lock_days"] == 1
    vm = make_vm(size=32 * 1024 * 1024)
    first = cli("backup", str(vm), "--json").json()
    first_hashes = disk_hashes(vm)
    modify_demo_vm(vm, 11)
    second = cli("backup", str(vm), "--mode", "delta", "--json").json()

    client = seaweed.client()
    chunk_key = next(
        o["Key"]
        for o in client.list_objects_v2(Bucket="imm-locked", Prefix=f"{prefix}/{data}")["Contents"]
    )
    version = client.head_object(Bucket="imm-locked", Key=chunk_key)["VersionId"]
    with pytest.raises(ClientError) as denied:  # a thief with the keys, using the plain API
        client.delete_object(Bucket="imm-locked", Key=chunk_key, VersionId=version)
    assert denied.value.response["Error"]["Code"] == "AccessDenied"

    dry = cli("prune", "--keep-last", "1", "--dry-run", "--json").json()
    assert dry["removed"] == [] and dry["locked"][0]["restore_point"] == first["restore_point"]
    pruned = cli("prune", "--keep-last", "1", "--json").json()
    assert pruned["removed"] == []
    assert [p["restore_point"] for p in pruned["locked"]] == [first["restore_point"]]
    assert about_a_day_from_now(pruned["locked"][0]["until"])
    prune_text = cli("prune", "--keep-last", "1")
    text = prune_text.out + prune_text.err
    assert "locked, kept" in text and "1 restore points still locked" in text
    listed = [p["restore_point"] for p in cli("list", "--json").json()["restore_points"]]
    assert listed == [first["restore_point"], second["restore_point"]]
    forget = cli("forget", first["restore_point"], ok=False)
    assert "locked until" in forget.err

    out = cli("restore", first["restore_point"], "--to", str(tmp_path / "r"), "--json").json()
    assert disk_hashes(Path(out["location"])) == first_hashes
    assert cli("verify", "--json").json()["ok"]
    probe = cli("remote", "test", "vault", "--size", "4", "--json").json()
    assert probe["immutable"] is True and probe["ok"], probe["checks"]


@pytest.mark.parametrize(("fmt", "orphan_dir"), [("1", "chunks"), ("3", "packs")])
def test_s3_gc_keeps_locked_garbage(
    cli: Cli, seaweed: SeaweedServer, make_vm: Callable[..., Path], fmt: str, orphan_dir: str
) -> None:
    """A backup killed after uploading its chunks (packs) leaves locked garbage: gc keeps
    it, and everything else of the repository with it."""
    cli.env.update(
        AWS_ACCESS_KEY_ID=seaweed.access_key,
        AWS_SECRET_ACCESS_KEY=seaweed.secret_key,
        AWS_EC2_METADATA_DISABLED="true",
    )
    prefix = f"gc{fmt}-{os.getpid()}"
    url = s3_url(seaweed, "imm-locked", prefix)
    cli("remote", "add", "vault", url, "--format", fmt, "--lock-days", "1")
    vm = make_vm(size=32 * 1024 * 1024)
    point = cli("backup", str(vm), "--json").json()["restore_point"]
    client = seaweed.client()
    manifest = f"{prefix}/manifests/{point}"
    assert client.head_object(Bucket="imm-locked", Key=manifest)["ObjectLockMode"] == "COMPLIANCE"
    # What a backup killed between its uploads and its manifest leaves: a locked chunk that
    # no restore point references.
    orphan = f"{prefix}/{orphan_dir}/ff/" + "ff" * 32
    client.put_object(
        Bucket="imm-locked",
        Key=orphan,
        Body=b"orphan",
        ObjectLockMode="COMPLIANCE",
        ObjectLockRetainUntilDate=datetime.now(UTC) + timedelta(days=1),
    )
    report = cli("gc", "--json").json()
    assert report["chunks_deleted"] == 0 and report["locked"]["count"] == 1
    assert about_a_day_from_now(report["locked"]["first_unlock"])
    gc_text = cli("gc")
    assert "1 unreferenced chunks still locked, kept" in gc_text.out + gc_text.err
    assert client.head_object(Bucket="imm-locked", Key=orphan)["ContentLength"] == 6
    listed = client.list_objects_v2(Bucket="imm-locked", Prefix=f"{prefix}/")["Contents"]
    assert sum(o["Key"].startswith(f"{prefix}/{orphan_dir}/") for o in listed) >= 2


@pytest.fixture
def immutable_dir(tmp_path: Path) -> Iterator[Path]:
    yield from immutable_vault(tmp_path)


def test_local_chattr_end_to_end(
    cli: Cli, immutable_dir: Path, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    added = cli("remote", "add", "vault", str(immutable_dir), "--lock-days", "1")
    assert "vmkeep-immutable apply" in added.out + added.err
    vm = make_vm(size=32 * 1024 * 1024)
    first = cli("backup", str(vm), "--json").json()
    first_hashes = disk_hashes(vm)
    modify_demo_vm(vm, 13)
    cli("backup", str(vm), "--mode", "delta")
    applied = subprocess.run([HELPER, "apply", str(immutable_dir)], capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    assert "objects immutable" in applied.stdout
    manifest = immutable_dir / "manifests" / first["restore_point"]
    assert is_immutable(manifest)
    # format 3 (the default): the point's packs and index objects too
    data = [p for d in ("packs", "index") for p in (immutable_dir / d).rglob("*") if p.is_file()]
    assert len(data) >= 3 and all(is_immutable(p) for p in data)
    rm = subprocess.run(["rm", "-f", str(manifest)], capture_output=True, text=True)
    assert rm.returncode != 0 and manifest.exists()

    pruned = cli("prune", "--keep-last", "1", "--json").json()
    assert [p["restore_point"] for p in pruned["locked"]] == [first["restore_point"]]
    assert about_a_day_from_now(pruned["locked"][0]["until"])
    prune_text = cli("prune", "--keep-last", "1")
    assert "1 restore points still locked" in prune_text.out + prune_text.err
    out = cli("restore", first["restore_point"], "--to", str(tmp_path / "r"), "--json").json()
    assert disk_hashes(Path(out["location"])) == first_hashes
    probe = cli("remote", "test", "vault", "--size", "4", "--json").json()
    assert probe["immutable"] is True and probe["ok"], probe["checks"]

    # Turning the lock off (or --lock-days 0 for one run) writes no record for later points.
    listed = cli("list", "--json").json()["restore_points"]
    assert about_a_day_from_now(listed[0]["locked_until"])
    unlocked = cli("backup", str(vm), "--lock-days", "0", "--json").json()["restore_point"]
    cli("remote", "lock", "vault", "--days", "0")
    assert "lock_days" not in cli("remote", "list", "--json").json()[0]
    unlocked2 = cli("backup", str(vm), "--json").json()["restore_point"]
    for point in (unlocked, unlocked2):
        assert not (immutable_dir / "retention" / point).exists()
    assert [p["locked_until"] for p in cli("list", "--json").json()["restore_points"][2:]] == [
        None,
        None,
    ]
    cli("forget", unlocked2)


def test_jobs_and_mirror_lock_what_they_write(
    cli: Cli, immutable_dir: Path, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    """A remote's lock is kept by every writer, not only by `vmkeep backup`: a job's run (the
    server's path) and a mirror into it lock their points; `mirror --lock-days 0` does not."""
    cli("remote", "add", "vault", str(immutable_dir), "--lock-days", "1")
    cli("remote", "add", "plain", str(tmp_path / "plain"))
    vm = make_vm("web01", 32 << 20)
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        f"kind: backup\nname: nightly\nremotes: [vault]\n"
        f"connector: {{type: files, root: {vm.parent}}}\nvms: [web01]\n"
    )
    cli("job", "apply", "-f", str(jobs))
    assert cli("job", "run", "nightly", "--json", timeout=300).json()["state"] == "success"
    (job_point,) = cli("list", "--remote", "vault", "--json").json()["restore_points"]
    assert about_a_day_from_now(job_point["locked_until"])
    applied = subprocess.run([HELPER, "apply", str(immutable_dir)], capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    assert is_immutable(immutable_dir / "manifests" / job_point["restore_point"])

    modify_demo_vm(vm, 5)
    cli("backup", str(vm), "--remote", "plain")
    cli("mirror", "plain", "vault", "--json")
    listed = cli("list", "--remote", "vault", "--json").json()["restore_points"]
    copied = [p for p in listed if p["restore_point"] != job_point["restore_point"]]
    assert len(copied) == 1 and about_a_day_from_now(copied[0]["locked_until"])

    modify_demo_vm(vm, 6)
    cli("backup", str(vm), "--remote", "plain")
    cli("mirror", "plain", "vault", "--lock-days", "0")
    listed = cli("list", "--remote", "vault", "--json").json()["restore_points"]
    assert [p["locked_until"] is None for p in listed].count(True) == 1
    out = cli(
        "restore",
        listed[-1]["restore_point"],
        "--remote",
        "vault",
        "--to",
        str(tmp_path / "r"),
        "--json",
    ).json()
    assert disk_hashes(Path(out["location"])) == disk_hashes(vm)
