"""The main job through the CLI on every remote kind, each against a real server on loopback."""

from __future__ import annotations

import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import Cli, disk_hashes


def _s3() -> Iterator[tuple[str, dict[str, str]]]:
    from tests.remotes.s3_server import SeaweedServer, started_or_skip

    with (
        tempfile.TemporaryDirectory(prefix="vmkeep-e2e-s3-", ignore_cleanup_errors=True) as work,
        started_or_skip(SeaweedServer(Path(work)), ("vmkeep",)) as server,
    ):
        url = f"s3://vmkeep/repo?endpoint={server.endpoint}&region=us-east-1&path_style=1"
        yield (
            url,
            {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key},
        )


def _azure() -> Iterator[tuple[str, dict[str, str]]]:
    from azure.storage.blob import BlobServiceClient

    from tests.remotes.azure_server import ServerUnavailable, start_azurite, stop_azurite

    try:
        server = start_azurite()
    except ServerUnavailable as exc:
        pytest.skip(f"no Azurite: {exc}")
    try:
        BlobServiceClient.from_connection_string(server.connection_string).create_container("e2e")
        yield (
            f"azure://e2e/repo?account=devstoreaccount1&endpoint={server.endpoint}",
            {"AZURE_STORAGE_CONNECTION_STRING": server.connection_string},
        )
    finally:
        stop_azurite(server)


def _smb() -> Iterator[tuple[str, dict[str, str]]]:
    from tests.remotes.smb_server import SambaServer, ServerUnavailable

    server = SambaServer()
    try:
        server.start()
    except ServerUnavailable as exc:
        server.cleanup()
        pytest.skip(f"no Samba server: {exc}")
    try:
        yield server.url(f"repo-{uuid.uuid4().hex[:8]}"), {"VMKEEP_SMB_PASSWORD": server.password}
    finally:
        server.cleanup()


SERVERS = {"s3": _s3, "azure": _azure, "smb": _smb}


@pytest.fixture(params=sorted(SERVERS))
def remote(request: pytest.FixtureRequest, cli: Cli) -> Iterator[str]:
    servers = SERVERS[request.param]()
    url, env = next(servers)
    cli.env.update(env)
    yield url
    next(servers, None)


def test_main_job_on_every_remote(
    cli: Cli, remote: str, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    from vmkeep.connectors.files.demo import modify_demo_vm

    assert cli("remote", "test", remote, "--size", "8", "--json").json()["ok"]
    cli("remote", "add", "far", remote)  # creates the encrypted repository
    vm = make_vm()
    first = cli("backup", str(vm), "--json").json()
    first_hashes = disk_hashes(vm)
    modify_demo_vm(vm, 1)
    second = cli("backup", str(vm), "--mode", "delta", "--json").json()
    assert 1 <= second["chunks_new"] <= 2  # only the changed chunks travel
    points = [p["restore_point"] for p in cli("list", "--json").json()["restore_points"]]
    assert points == [first["restore_point"], second["restore_point"]]
    out = cli("restore", first["restore_point"], "--to", str(tmp_path / "r"), "--json").json()
    assert disk_hashes(Path(out["location"])) == first_hashes
    assert cli("verify", "--json").json()["ok"]
    cli("prune", "--keep-last", "1")
    assert cli("gc", "--json").json()["chunks_deleted"] >= 1  # the first point's own chunk
    left = cli("list", "--json").json()["restore_points"]
    assert [p["restore_point"] for p in left] == [second["restore_point"]]
    assert cli("verify", "--json").json()["ok"]


# What is not vmkeep's on stderr: a Python warning (`file.py:83: SomeWarning: ...`), its indented
# source line, a traceback, a logging record. vmkeep's own lines are unindented sentences.
FOREIGN = re.compile(r"\.py:\d+|\w+Warning\b|Traceback|^\s|^(DEBUG|INFO|WARNING|CRITICAL)\b")


@pytest.mark.parametrize("kind", ["local", *sorted(SERVERS)])
def test_stderr_carries_only_vmkeep_lines(
    kind: str, cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    """A representative command of each remote kind, succeeding and failing: every line on
    stderr is vmkeep's (issue: Debian's pyOpenSSL leaked into the venv printed warnings)."""
    local = iter([(str(tmp_path / "repo"), {})])
    servers = local if kind == "local" else SERVERS[kind]()
    url, env = next(servers)
    cli.env.update(env)
    try:
        vm = make_vm()
        runs = [
            cli("remote", "test", url, "--size", "8"),
            cli("remote", "add", "far", url),
            cli("backup", str(vm)),
            cli("list"),
            cli("verify"),
            cli("list", ok=False, env={"VMKEEP_PASSPHRASE": "not the passphrase"}),
            cli("restore", "no-such-point", "--to", str(tmp_path / "r"), ok=False),
        ]
    finally:
        next(servers, None)
    for run in runs:
        foreign = [line for line in run.err.splitlines() if line and FOREIGN.search(line)]
        assert not foreign, f"lines on stderr that are not vmkeep's: {foreign}"
    assert runs[-1].err.strip().splitlines() == [runs[-1].err.strip()]  # one line
