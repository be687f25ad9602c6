"""Start-up stays light (issue 15): `vmkeep --help` and a local `vmkeep list` must not import
the SDKs of other remotes, libvirt, the state database, nor (for --help) the repository and
the operations. Checked by what is in sys.modules after the CLI ran, in a fresh interpreter;
the time itself is measured by bench/startup.py, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VMKEEP = str(Path(sys.executable).with_name("vmkeep"))

# Never needed to list a local repository or to show help.
HEAVY = (
    "boto3",
    "botocore",
    "azure",
    "smbprotocol",
    "smbclient",
    "libvirt",
    "sqlalchemy",
    "alembic",
    "croniter",
    "yaml",
    "vmkeep.engine",
    "vmkeep.connectors",
    "vmkeep.operations",
    "rich.progress",
)
# Not needed for help either: the repository's crypto, compression and hashing.
DATA_PATH = (
    "vmkeep.repository",
    "vmkeep.remotes",
    "cryptography",
    "argon2",
    "zstandard",
    "blake3",
    "vmkeep.parallel",  # and the data path's thread pools (concurrent.futures, logging)
    "concurrent.futures",
)

RUN_CLI = """
import json, sys
out = sys.argv[1]
sys.argv = ["vmkeep", *sys.argv[2:]]
from vmkeep.interfaces.cli.app import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
with open(out, "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


def run_cli(tmp_path: Path, *args: str) -> tuple[int, set[str], str]:
    """The CLI's exit code, the modules loaded once it finished, and its stdout."""
    result = tmp_path / "modules.json"
    env = dict(os.environ, VMKEEP_DATA_DIR=str(tmp_path / "state"), COLUMNS="120")
    env.pop("VMKEEP_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CLI, str(result), *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    found = json.loads(result.read_text())
    return found["code"], set(found["modules"]), proc.stdout


def loaded(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    """The packages of `packages` that are in `modules` (a package or any of its submodules)."""
    return sorted(p for p in packages if any(m == p or m.startswith(p + ".") for m in modules))


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("list", "--help"),
        ("backup", "--help"),
        ("server", "--help"),
        ("healthcheck", "--help"),
        ("schedule", "next", "--help"),
        ("plan", "--help"),
        ("remote", "add", "--help"),
    ],
    ids=" ".join,
)
def test_help_imports_neither_remotes_nor_the_data_path(tmp_path: Path, args: tuple[str]) -> None:
    code, modules, out = run_cli(tmp_path, *args)
    assert code == 0
    assert "Usage" in out
    assert loaded(modules, HEAVY + DATA_PATH) == []


def test_top_level_help_does_not_even_import_pydantic(tmp_path: Path) -> None:
    """typer imports pydantic for its parameter adapters, which the CLI builds only for a value
    that needs converting (interfaces/cli/plain_params.py); the list of commands needs
    nothing beyond typer and rich."""
    code, modules, _ = run_cli(tmp_path, "--help")
    assert code == 0
    assert loaded(modules, ("pydantic",)) == []


def test_local_list_imports_no_other_remote_nor_the_state_database(tmp_path: Path) -> None:
    repo, vms = tmp_path / "repo", tmp_path / "vms"
    env = dict(os.environ, VMKEEP_DATA_DIR=str(tmp_path / "setup-state"))
    for step in (
        ["init", "--encryption", "none", str(repo)],
        ["vm", "create-demo", "--size", "32", str(vms)],
        ["backup", "--remote", str(repo), str(vms / "demo")],
    ):
        subprocess.run([VMKEEP, *step], check=True, capture_output=True, env=env)
    code, modules, out = run_cli(tmp_path, "list", "--remote", str(repo), "--json")
    assert code == 0
    assert [p["vm"] for p in json.loads(out)["restore_points"]] == ["demo"]
    assert loaded(modules, HEAVY) == []
    assert not (tmp_path / "state").exists()  # nor opened the state database


def test_defaults_repeated_in_the_cli_match_the_engine() -> None:
    """Two option defaults are repeated in the CLI so that registering the command does not
    import the engine or the operation: they must stay equal."""
    from vmkeep.engine.server import DEFAULT_GRACE_S
    from vmkeep.interfaces.cli import healthcheck_commands, server_commands
    from vmkeep.operations.healthcheck_model import DEFAULT_TIMEOUT

    assert server_commands.DEFAULT_GRACE_S == DEFAULT_GRACE_S
    assert healthcheck_commands.DEFAULT_TIMEOUT == DEFAULT_TIMEOUT


def test_json_backup_and_restore_import_neither_rich_nor_typers_adapters(tmp_path: Path) -> None:
    """`backup --json` and `restore --json` print nothing through rich (the console is made at
    its first use: output.LazyConsole) and give typer only values that need no conversion
    (plain_params.py); the restore is still the VM that was backed up."""
    repo, vms = tmp_path / "repo", tmp_path / "vms"
    env = dict(os.environ, VMKEEP_DATA_DIR=str(tmp_path / "setup-state"))
    for step in (
        ["init", "--encryption", "none", str(repo)],
        ["vm", "create-demo", "--size", "32", str(vms)],
    ):
        subprocess.run([VMKEEP, *step], check=True, capture_output=True, env=env)
    code, modules, out = run_cli(
        tmp_path, "backup", "--remote", str(repo), str(vms / "demo"), "--json"
    )
    assert code == 0
    assert loaded(modules, ("rich", "typer._adapters")) == []
    point = json.loads(out)["restore_point"]
    to = tmp_path / "restored"
    code, modules, out = run_cli(
        tmp_path, "restore", point, "--remote", str(repo), "--to", str(to), "--json"
    )
    assert code == 0
    assert loaded(modules, ("rich", "typer._adapters")) == []
    original = (vms / "demo" / "disk0.raw").read_bytes()
    assert (to / "demo" / "disk0.raw").read_bytes() == original
