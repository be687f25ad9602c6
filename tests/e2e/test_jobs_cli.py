"""`vmkeep job` and `vmkeep run` end to end: the real command, a per-test VMKEEP_DATA_DIR."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from .conftest import Cli, disk_hashes


def job_file(tmp_path: Path, vms: Path, name: str = "jobs.yaml", extra: str = "") -> Path:
    path = tmp_path / name
    path.write_text(
        f"""kind: backup
name: nightly
remotes: [nas, usb]
connector: {{type: files, root: {vms}}}
vms: ["web*"]
schedules:
  - {{name: daily, cron: "0 2 * * *", timezone: Europe/Paris, keep: 7}}
{extra}"""
    )
    return path


def setup(cli: Cli, tmp_path: Path) -> None:
    for name in ("nas", "usb"):
        cli("remote", "add", name, str(tmp_path / name), "--chunk-size", "256K")


def test_job_apply_run_show_restore(cli: Cli, make_vm: Callable[..., Path], tmp_path: Path) -> None:
    web01, web02 = make_vm("web01", 32 << 20), make_vm("web02", 32 << 20)
    make_vm("db01", 32 << 20)  # not selected by "web*"
    setup(cli, tmp_path)
    cli("job", "apply", "-f", str(job_file(tmp_path, web01.parent)))
    listed = cli("job", "list", "--json").json()
    assert [(j["name"], j["kind"]) for j in listed] == [("nightly", "backup")]
    assert listed[0]["schedules"][0]["keep"] == 7

    run = cli("job", "run", "nightly", "--json", timeout=300).json()
    assert run["state"] == "success"
    vm_tasks = run["tasks"][0]["children"]
    assert sorted(t["label"] for t in vm_tasks) == ["web01", "web02"]

    runs = cli("run", "list", "--json").json()
    assert [(r["id"], r["job"], r["state"]) for r in runs] == [(run["id"], "nightly", "success")]
    shown = cli("run", "show", str(run["id"])).out
    assert "vm web01: success" in shown and "target usb: success" in shown

    points = cli("list", "--remote", "usb", "--json").json()["restore_points"]
    point = next(p for p in points if p["vm"] == "web02")
    out = tmp_path / "restored"
    out.mkdir()
    cli("restore", point["restore_point"], "--remote", "usb", "--to", str(out))
    assert disk_hashes(out / "web02") == disk_hashes(web02)
    assert cli("run", "cancel", str(run["id"])).err.startswith(f"run {run['id']} already ended")

    exported = cli("job", "export", "nightly").out
    assert "name: nightly" in exported and "Europe/Paris" in exported
    (tmp_path / "again.yaml").write_text(exported)
    cli("job", "apply", "-f", str(tmp_path / "again.yaml"))
    assert len(cli("schedule", "next", "daily", "-n", "3", "--json").json()["fires"]) == 3

    cli("job", "delete", "nightly")
    assert cli("job", "list", "--json").json() == []
    assert cli("run", "list", "--json").json()[0]["id"] == run["id"]  # runs stay


def test_job_apply_of_a_bad_file_leaves_nothing(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    vm = make_vm("web01", 32 << 20)
    setup(cli, tmp_path)
    good = job_file(tmp_path, vm.parent).read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(good + "---\nkind: mirror\nname: copy\nsource: nas\ntargets: [s4]\n")
    err = cli("job", "apply", "-f", str(bad), ok=False).err
    assert "bad.yaml:" in err and "unknown remote 's4'" in err
    assert len(err.strip().splitlines()) == 1
    never = tmp_path / "never.yaml"
    never.write_text(good.replace('"0 2 * * *"', '"0 0 30 2 *"'))
    err = cli("job", "apply", "-f", str(never), ok=False).err
    assert "never.yaml" in err and "cron" in err
    assert cli("job", "list", "--json").json() == []
    db = sqlite3.connect(tmp_path / "data" / "vmkeep.db")
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM schedules").fetchone() == (0,)


def test_job_run_with_one_remote_gone_exits_1_and_is_partial(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    vm = make_vm("web01", 32 << 20)
    setup(cli, tmp_path)
    cli("job", "apply", "-f", str(job_file(tmp_path, vm.parent)))
    (tmp_path / "usb").rename(tmp_path / "usb-unplugged")
    run = cli("job", "run", "nightly", "--json", ok=False, timeout=300)
    assert run.code == 1 and run.json()["state"] == "partial"
    assert len(cli("list", "--remote", "nas", "--json").json()["restore_points"]) == 1
    assert "error:" in cli("run", "show", str(run.json()["id"])).out


def test_unknown_job_and_run_are_one_line_errors(cli: Cli) -> None:
    assert "no job named 'ghost'" in cli("job", "run", "ghost", ok=False).err
    assert "no run 42" in cli("run", "show", "42", ok=False).err
    assert "no schedule named 'ghost'" in cli("schedule", "next", "ghost", ok=False).err
