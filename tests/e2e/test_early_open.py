"""`backup` and `restore` on a path remote start the key derivation before typer and rich are
imported (interfaces/cli/early_open.py): the timeline shows it begun before the command ran,
the data is the same, and the passphrase and the errors are the ones the command always used."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.e2e.conftest import Cli, disk_hashes
from tests.e2e.test_trace_timeline import events, first


def traced(cli: Cli, trace: Path, *args: str, ok: bool = True) -> list[tuple[float, str, str]]:
    cli(*args, ok=ok, env={"VMKEEP_TRACE": str(trace)})
    return events(trace)


def test_key_derivation_begins_before_the_command_runs(
    tmp_path: Path, cli: Cli, make_vm: Callable[..., Path]
) -> None:
    vm = make_vm(size=32 * 1024 * 1024, fmt="qcow2")
    repo = tmp_path / "repo"
    cli("init", str(repo))  # encrypted, the default
    trace = tmp_path / "b.trace"
    backup = cli(
        "backup", str(vm), "--remote", str(repo), "--json", env={"VMKEEP_TRACE": str(trace)}
    )
    evs = events(trace)
    assert first(evs, "kdf+") < first(evs, "kdf-") < first(evs, "opened")
    assert first(evs, "kdf+") < first(evs, "cli")  # begun before typer parsed the command
    point = backup.json()["restore_point"]

    to = tmp_path / "restored"
    args = ("restore", point, "--remote", str(repo), "--to", str(to), "--json")
    evs = traced(cli, tmp_path / "r.trace", *args)
    assert first(evs, "kdf+") < first(evs, "cli") < first(evs, "opened") < first(evs, "data")
    assert disk_hashes(to / vm.name) == disk_hashes(vm)


def test_a_named_remote_or_help_starts_nothing_early(
    tmp_path: Path, cli: Cli, make_vm: Callable[..., Path]
) -> None:
    """A remote name needs the state database, so its key is derived when the command runs."""
    vm = make_vm(size=32 * 1024 * 1024)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    cli("remote", "add", "here", str(repo))
    evs = traced(cli, tmp_path / "b.trace", "backup", str(vm), "--remote", "here", "--json")
    assert first(evs, "cli") < first(evs, "kdf+") < first(evs, "opened")
    trace = tmp_path / "h.trace"
    cli("backup", "--remote", str(repo), "--help", env={"VMKEEP_TRACE": str(trace)})
    assert not trace.exists()  # nothing traced: neither the repository nor the key touched


def test_the_passphrase_file_wins_over_the_environment_as_before(
    tmp_path: Path, cli: Cli, make_vm: Callable[..., Path]
) -> None:
    vm = make_vm(size=32 * 1024 * 1024)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_text(cli.env["VMKEEP_PASSPHRASE"] + "\n")
    wrong.write_text("not the passphrase\n")
    bad_env = {"VMKEEP_PASSPHRASE": "not the passphrase", "VMKEEP_TRACE": str(tmp_path / "t")}
    backup = ("backup", str(vm), "--remote", str(repo), "--json")
    cli("--passphrase-file", str(right), *backup, env=bad_env)
    assert first(events(tmp_path / "t"), "kdf+") < first(events(tmp_path / "t"), "cli")
    cli(f"--passphrase-file={right}", *backup, env=bad_env)
    run = cli("--passphrase-file", str(wrong), *backup, ok=False)
    assert run.code not in (0, 70)
    assert run.err.strip().splitlines()[-1] == (
        "error: wrong passphrase: no key of this repository opens with it"
    )
    assert len(cli("list", "--remote", str(repo), "--json").json()["restore_points"]) == 2


def test_errors_are_the_commands_own(tmp_path: Path, cli: Cli) -> None:
    """A missing repository or an unreadable passphrase file fail with the message the command
    gives without the head start: one line, no traceback, not the internal-error code."""
    missing = tmp_path / "nothing-here"
    run = cli("restore", "x", "--remote", str(missing), "--to", str(tmp_path / "t"), ok=False)
    assert run.code not in (0, 70)
    assert f"no vmkeep repository at {missing}" in run.err
    assert not (tmp_path / "t").exists()
    repo = tmp_path / "repo"
    cli("init", str(repo))
    absent = tmp_path / "no-such-file"
    run = cli("--passphrase-file", str(absent), "restore", "x", "--remote", str(repo), ok=False)
    assert run.code == 2
    assert f"cannot read passphrase file {absent}" in run.err.strip().splitlines()[-1]
    run = cli("restore", "x", "--remote", str(repo), ok=False, env={"VMKEEP_PASSPHRASE": "nope"})
    assert "wrong passphrase" in run.err.strip().splitlines()[-1]
    assert run.code not in (0, 70)
