"""`vmkeep plan`: the real command on a job file and a named remote with earlier runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.e2e.conftest import Cli


def test_plan_measures_earlier_runs_and_refuses_bad_input(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    vm = make_vm("web01", 32 << 20)
    cli("remote", "add", "nas", str(tmp_path / "nas"))
    job = tmp_path / "job.yaml"
    job.write_text(
        f"kind: backup\nname: nightly\nremotes: [nas]\nconnector: {{type: files, root: "
        f"{vm.parent}}}\nvms: ['web*']\nschedules:\n"
        "  - {name: daily, cron: '0 2 * * *', keep: 7}\nretention: {monthly: 3}\n"
    )
    cli("backup", str(vm), "--schedule", "daily")
    cli("vm", "change-demo", str(vm), "--seed", "1")
    cli("backup", str(vm), "--schedule", "daily")
    plan = cli("plan", str(job), "--json").json()
    (remote,) = plan["remotes"]
    assert plan["runs_per_day"] == 1 and plan["retention"]["kept_points_per_vm"] == 7 + 2
    assert remote["change_rate_source"] == "measured (2 points)"
    assert remote["vms"][0]["name"] == "web01"
    assert remote["stored_bytes_low"] <= remote["stored_bytes"] < 9 * remote["vms"][0]["data_bytes"]
    given = cli("plan", str(job), "--change-rate", "5", "--compression", "0.5", "--json").json()
    assert given["remotes"][0]["change_rate"] == 0.05
    assert "stored" in cli("plan", str(job)).out

    data = {"VMKEEP_DATA_DIR": str(tmp_path / "data")}
    err = cli("plan", "nightly", ok=False, env=data).err
    assert err.strip() == "error: no job named 'nightly'"
    (tmp_path / "m.yaml").write_text("kind: mirror\nname: c\nsource: a\ntargets: [b]\n")
    err = cli("plan", str(tmp_path / "m.yaml"), ok=False).err
    assert "mirror 'c' is not a backup job" in err and err.count("\n") == 1
    (tmp_path / "bad.yaml").write_text("kind: backup\nname: [\n")
    assert "malformed YAML" in cli("plan", str(tmp_path / "bad.yaml"), ok=False).err
    assert "--change-rate" in cli("plan", str(job), "--change-rate", "120", ok=False).err
