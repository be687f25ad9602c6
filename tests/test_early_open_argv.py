"""Which command lines get the key derivation's head start (interfaces/cli/early_open.py):
only `backup` and `restore` with one local path --remote, never --help nor another command;
what is taken must match the remote and passphrase file typer parsed."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmkeep.interfaces.cli import early_open
from vmkeep.interfaces.cli.early_open import wanted_open


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (["vmkeep", "backup", "vm", "--remote", "/r"], ("/r", None)),
        (["/venv/bin/vmkeep", "restore", "p", "-r", "./r", "--to", "/t"], ("./r", None)),
        (["x/cli/app.py", "backup", "vm", "--remote", "/r"], ("/r", None)),
        (["vmkeep", "--passphrase-file", "/p", "backup", "--remote", "/r"], ("/r", Path("/p"))),
        (["vmkeep", "--passphrase-file=/p", "restore", "--remote", "/r"], ("/r", Path("/p"))),
        (["vmkeep", "backup", "vm", "--remote", "/r", "--", "--help"], ("/r", None)),
    ],
)
def test_data_commands_on_a_location_are_opened_early(
    argv: list[str], wanted: tuple[str, Path | None]
) -> None:
    assert wanted_open(argv) == wanted


@pytest.mark.parametrize(
    "argv",
    [
        ["vmkeep", "list", "--remote", "/r"],  # not a data command
        ["vmkeep", "backup", "vm", "--remote", "here"],  # a remote name: the state database
        ["vmkeep", "backup", "--remote=s3://b/x", "vm"],  # a request: after typer's checks
        ["vmkeep", "restore", "p", "-r", "smb://h/s/r"],
        ["vmkeep", "backup", "vm"],  # the default remote
        ["vmkeep", "backup", "vm", "--remote", "/r", "--help"],
        ["vmkeep", "backup", "-r", "/a", "--remote", "/b"],  # which one typer keeps: not here
        ["vmkeep", "--help", "backup", "--remote", "/r"],
        ["vmkeep", "--passphrase-file"],
        ["vmkeep"],
        ["pytest", "backup", "--remote", "/r"],  # not the CLI's entry point
        [],
    ],
)
def test_anything_else_is_left_to_the_command(argv: list[str]) -> None:
    assert wanted_open(argv) is None


def test_taken_only_by_the_same_remote_and_passphrase_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmkeep.remotes.location import open_remote
    from vmkeep.repository.repository import Repository

    repo = tmp_path / "repo"
    Repository.init(open_remote(str(repo)), "aes-256-gcm", lambda confirm=False: b"pass phrase")
    monkeypatch.setenv("VMKEEP_PASSPHRASE", "pass phrase")
    argv = ["vmkeep", "backup", "vm", "--remote", str(repo)]
    for remote, file in ((str(repo) + "/", None), (str(repo), tmp_path / "p")):
        monkeypatch.setattr(early_open, "_tried", False)
        early_open.start(argv)
        assert early_open.take(remote, file) is None
        assert early_open.take(str(repo), None) is None  # taken once, even when not used
    early_open.start(argv)  # once per process: app.py executed twice starts nothing more
    assert early_open.take(str(repo), None) is None
    monkeypatch.setattr(early_open, "_tried", False)
    early_open.start(argv)
    opened = early_open.take(str(repo), None)
    assert opened is not None
    assert (
        opened().config["id"]
        == Repository.open(open_remote(str(repo)), lambda: b"pass phrase").config["id"]
    )
    assert early_open.take(str(repo), None) is None
