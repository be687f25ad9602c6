"""`vmkeep config backup|restore|list|show` through the real command: a configured install is
backed up, its data directory wiped, and a fresh one restored lists every backup again."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from vmkeep.engine.state import JobStore, ScheduleSpec, SecretStore, StateDB

from .conftest import PASSPHRASE, Cli

SECRET = b"azure-account-key-0123456789"


def test_config_backup_wipe_restore_lists_every_backup(
    cli: Cli, tmp_path: Path, make_vm: Callable[..., Path]
) -> None:
    data = tmp_path / "data"
    cli.env["VMKEEP_DATA_DIR"] = str(data)
    db = StateDB.open(data)  # the state a server would have: a job, schedules, a secret
    JobStore(db).put_job(
        "nightly",
        "backup",
        {"remotes": ["nas", "offsite"]},
        [ScheduleSpec("daily", "0 2 * * *", "Europe/Paris", keep=7)],
    )
    SecretStore(db).put_secret("remote.offsite.key", SECRET)
    db.close()
    cli("remote", "add", "nas", str(tmp_path / "nas"))
    cli("remote", "add", "offsite", str(tmp_path / "offsite"), "--encryption", "none")
    vm = make_vm("web01", size=32 << 20)
    points = {}
    for remote in ("nas", "offsite"):
        cli("backup", str(vm), "--remote", remote)
        points[remote] = [p["restore_point"] for p in list_points(cli, remote)]
        assert len(points[remote]) == 1

    made = cli("config", "backup", "nas", "--libvirt-uri", libvirt_uri(), "--json").json()
    assert [p["id"] for p in cli("config", "list", "nas", "--json").json()["points"]] == [
        made["point_id"]
    ]

    shutil.rmtree(data)  # the server is lost
    shutil.rmtree(tmp_path / "config", ignore_errors=True)  # a remotes.json of old
    fresh = tmp_path / "fresh"
    cli.env["VMKEEP_DATA_DIR"] = str(fresh)
    bad = cli(
        "config", "restore", str(tmp_path / "nas"), ok=False, env={"VMKEEP_PASSPHRASE": "wrong"}
    )
    assert "wrong passphrase" in bad.err
    assert not fresh.exists()  # nothing written

    cli("config", "restore", str(tmp_path / "nas"))
    for remote in ("nas", "offsite"):
        assert [p["restore_point"] for p in list_points(cli, remote)] == points[remote]
    db = StateDB.open(fresh)
    assert [s.name for s in JobStore(db).get_job("nightly").schedules] == ["daily"]
    assert SecretStore(db).get_secret("remote.offsite.key") == SECRET
    db.close()

    again = cli("config", "restore", str(tmp_path / "nas"), ok=False)
    assert "not empty" in again.err
    cli("config", "restore", str(tmp_path / "nas"), "--force")

    shown = cli("config", "show", "nas", "--libvirt").out
    if libvirt_uri() == "test:///default":
        assert "<name>test</name>" in shown and "<!-- domain test" in shown


def test_config_errors_are_one_line(cli: Cli, tmp_path: Path) -> None:
    cli.env["VMKEEP_DATA_DIR"] = str(tmp_path / "data")
    cli("init", str(tmp_path / "repo"))
    cli("config", "list", str(tmp_path / "repo"))
    missing = cli("config", "restore", str(tmp_path / "repo"), ok=False)
    assert "no metadata backup" in missing.err
    assert "--keep" in cli("config", "backup", str(tmp_path / "repo"), "--keep", "0", ok=False).err
    cli("config", "backup", str(tmp_path / "repo"))
    assert (
        "no libvirt metadata"
        in cli("config", "show", str(tmp_path / "repo"), "--libvirt", ok=False).err
    )
    wrong_file = tmp_path / "meta-pass"
    wrong_file.write_text("not the one\n")
    run = cli(
        "config",
        "restore",
        str(tmp_path / "repo"),
        "--metadata-passphrase-file",
        str(wrong_file),
        ok=False,
        env={"VMKEEP_DATA_DIR": str(tmp_path / "fresh")},
    )
    assert "wrong metadata passphrase" in run.err
    assert PASSPHRASE not in run.err


def list_points(cli: Cli, remote: str) -> list[dict[str, str]]:
    rows = cli("list", "--remote", remote, "--json").json()["restore_points"]
    assert isinstance(rows, list)
    return rows


def libvirt_uri() -> str:
    """libvirt's in-process test driver when the bindings are there."""
    try:
        import libvirt  # noqa: F401
    except ImportError:
        pytest.skip("libvirt-python is not installed")
    return "test:///default"
