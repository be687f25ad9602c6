"""`vmkeep prune --keep-schedule`: per-schedule keep-last plus one long-term history per VM, on
real backups tagged with two schedules, then gc, verify and a hash-equal restore."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .conftest import Cli, disk_hashes


def test_prune_keeps_each_schedules_last_and_one_long_term_history(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    from vmkeep.connectors.files.demo import modify_demo_vm

    vm = make_vm(size=32 * 1024 * 1024)
    remote = ("--remote", str(repo_dir))
    points: dict[str, str] = {}
    hashes: dict[str, dict[str, str]] = {}
    # oldest first: a manual backup, then the two schedules interleaved
    for name, tag in [
        ("u1", ""),
        ("n1", "nightly"),
        ("h1", "hourly"),
        ("h2", "hourly"),
        ("n2", "nightly"),
        ("h3", "hourly"),
    ]:
        modify_demo_vm(vm, len(points) + 1)
        hashes[name] = disk_hashes(vm)
        run = cli("backup", str(vm), *remote, "--mode", "delta", "--schedule", tag, "--json")
        points[name] = run.json()["restore_point"]
    by_id = {point: name for name, point in points.items()}
    policy = ("--keep-schedule", "hourly=1", "--keep-schedule", "nightly=1", "--keep-daily", "1")

    dry = cli("prune", *remote, *policy, "--dry-run", "--json").json()
    reasons = {by_id[d["restore_point"]]: d["reasons"] for d in dry["decisions"] if d["keep"]}
    today = next(r for r in reasons["h3"] if r.startswith("daily "))
    assert reasons == {
        "h3": ["last 1/1 of hourly", today],  # the day's newest point, whatever its schedule
        "n2": ["last 1/1 of nightly"],  # no second "daily" point for the nightly schedule
        "u1": ["untouched: no rule for schedule (no schedule)"],
    }
    assert sorted(by_id[p] for p in dry["removed"]) == ["h1", "h2", "n1"]

    cli("prune", *remote, *policy)
    listed = cli("list", *remote, "--json").json()["restore_points"]
    assert sorted(by_id[p["restore_point"]] for p in listed) == ["h3", "n2", "u1"]
    cli("gc", *remote)
    assert cli("verify", *remote, "--json").json()["ok"] is True
    assert hashes["n2"] != hashes["u1"] != hashes["h3"]  # each point holds other data
    for name in ("n2", "u1"):
        to = tmp_path / f"restored-{name}"
        out = cli("restore", points[name], *remote, "--to", str(to), "--json").json()
        assert disk_hashes(Path(out["location"])) == hashes[name]


def test_the_per_schedule_mode_still_warns_and_keeps_a_history_per_schedule(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path
) -> None:
    vm = make_vm(size=32 * 1024 * 1024)
    remote = ("--remote", str(repo_dir))
    ids = [
        cli("backup", str(vm), *remote, "--schedule", tag, "--json").json()["restore_point"]
        for tag in ("nightly", "hourly", "nightly", "hourly")
    ]
    run = cli("prune", *remote, "--keep-daily", "1", "--dry-run", "--json")
    assert "--keep-schedule" in run.err  # the warning points at the combined form
    assert sorted(run.json()["removed"]) == sorted(ids[:2])  # one "daily" point per schedule


def test_bad_keep_schedule_values_end_in_one_clear_line(cli: Cli, repo_dir: Path) -> None:
    remote = ("--remote", str(repo_dir))
    for args, message in [
        (("--keep-schedule", "hourly"), "--keep-schedule 'hourly': expected NAME=N"),
        (("--keep-schedule", "hourly=-1"), "expected NAME=N"),
        (("--keep-schedule", "a=1", "--keep-schedule", "a=2"), "schedule 'a' is given twice"),
        (("--keep-schedule", "a=1", "--keep-last", "2"), "does not combine with --keep-last"),
        (("--keep-schedule", "a=1", "--schedule", "a"), "does not combine with --keep-last"),
        (("--keep-schedule", "a=0"), "no retention given"),
        (("--keep-schedule", "a=1", "--keep-daily", "1", "--timezone", "Mars/X"), "Mars/X"),
    ]:
        run = cli("prune", *remote, *args, ok=False)
        assert message in run.err.strip().splitlines()[-1], run.err
