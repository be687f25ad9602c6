"""`remote add --remember-credentials`: S3 keys stored encrypted in the state database and used
by later commands and job runs with no AWS variables in their environment (real SeaweedFS)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import Cli, disk_hashes
from .test_remotes_cli import _s3

AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture
def s3() -> Iterator[tuple[str, dict[str, str]]]:
    servers = _s3()
    yield next(servers)
    next(servers, None)


def without_aws(cli: Cli) -> None:
    for var in (*AWS, "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        cli.env.pop(var, None)


def test_remembered_s3_credentials_serve_list_and_job_runs(
    cli: Cli, s3: tuple[str, dict[str, str]], make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    url, keys = s3
    secret = keys["AWS_SECRET_ACCESS_KEY"]
    vm = make_vm("web01", 32 << 20)
    without_aws(cli)
    out = cli("remote", "add", "far", url, "--remember-credentials", env=keys)
    assert "credentials remembered (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)" in out.err
    assert secret not in out.out + out.err

    # Without the keys the same URL cannot even be listed; the name can.
    denied = cli("list", "--remote", url, "--json", ok=False)
    assert secret not in denied.err
    first = cli("backup", str(vm), "--remote", "far", "--json").json()
    assert [p["restore_point"] for p in cli("list", "--json").json()["restore_points"]] == [
        first["restore_point"]
    ]
    job = tmp_path / "job.yaml"
    job.write_text(
        f"kind: backup\nname: nightly\nremotes: [far]\n"
        f"connector: {{type: files, root: {vm.parent}}}\nvms: [web01]\n"
    )
    cli("job", "apply", "-f", str(job))
    run = cli("job", "run", "nightly", "--json", timeout=300).json()
    assert run["state"] == "success", run
    points = cli("list", "--remote", "far", "--json").json()["restore_points"]
    assert len(points) == 2
    cli("restore", points[-1]["restore_point"], "--to", str(tmp_path / "r"))
    assert disk_hashes(tmp_path / "r" / "web01") == disk_hashes(vm)

    # Never in the clear: not in the listing, the raw database file or a SQL dump.
    listing = cli("remote", "list", "--json")
    assert secret not in listing.out and "AWS_SECRET" not in listing.out
    db_file = tmp_path / "data" / "vmkeep.db"
    assert db_file.is_file()
    for path in db_file.parent.iterdir():
        if path.is_file() and path.name != "server.key":
            assert secret.encode() not in path.read_bytes(), path
    with sqlite3.connect(db_file) as conn:
        dump = "\n".join(conn.iterdump())
    assert "remote/far/env/AWS_SECRET_ACCESS_KEY" in dump and secret not in dump

    # remove forgets them: the name is gone and so are its secrets.
    cli("remote", "remove", "far")
    with sqlite3.connect(db_file) as conn:
        names = [r[0] for r in conn.execute("select name from secrets")]
    assert not [n for n in names if n.startswith("remote/far/")]


def test_remember_credentials_needs_some(cli: Cli, tmp_path: Path) -> None:
    without_aws(cli)
    url = "s3://bucket/repo?endpoint=http://127.0.0.1:9&region=us-east-1"
    err = cli("remote", "add", "far", url, "--remember-credentials", ok=False).err
    assert "none of AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY is set" in err
    err = cli("remote", "add", "here", str(tmp_path / "r"), "--remember-credentials", ok=False).err
    assert "has no credentials" in err
    assert cli("remote", "list", "--json").json() == []  # nothing half-added
