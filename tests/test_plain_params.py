"""Values that need no conversion skip typer's pydantic adapters (interfaces/cli/plain_params.py):
every command line gives the command the same values, the same errors and the same exit code
as typer's own coercion, and a command run with only such values never imports pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer import core
from typer.testing import CliRunner

import vmkeep.interfaces.cli.app  # noqa: F401  (installs the pass-through, as the CLI does)
from tests.test_startup_imports import loaded, run_cli

received: list[dict[str, Any]] = []
demo = typer.Typer()


@demo.command()
def run(
    name: str = typer.Argument("vm"),
    count: int = typer.Option(3, min=1, max=10),
    low: int = typer.Option(0, min=1),  # a default the range refuses
    clamped: int = typer.Option(50, min=1, max=20, clamp=True),
    ratio: float = typer.Option(0.5, min=0),
    whole: float = typer.Option(2),  # an int default of a float: converted
    port: int | None = typer.Option(None, max=65535),
    path: Path | None = typer.Option(None),
    text: str | None = typer.Option(None),
    flag: bool = typer.Option(False),
    tags: list[str] = typer.Option([]),
    mode: str = typer.Option("full", parser=str.upper),
) -> None:
    received.append({k: (type(v).__name__, v) for k, v in locals().items()})


CASES = [
    [],
    ["web", "--count", "5", "--low", "2"],
    ["--low", "2", "--count", "11"],
    ["--low", "2", "--count", "x"],
    ["--low", "2", "--clamped", "99"],
    ["--low", "2", "--ratio", "-1"],
    ["--low", "2", "--ratio", "2", "--whole", "3"],
    ["--low", "2", "--port", "70000"],
    ["--low", "2", "--port", "22", "--path", "/a/b", "--text", " x ", "--flag"],
    ["--low", "2", "--tags", "a", "--tags", "b", "--mode", "delta"],
    ["--low", "1x"],
]


def outcome(args: list[str]) -> tuple[int, str, list[dict[str, Any]]]:
    received.clear()
    result = CliRunner().invoke(demo, args)
    return result.exit_code, result.output, list(received)


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a) or "defaults")
def test_same_values_and_errors_as_typers_own_coercion(
    args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert getattr(core.build_runtime_param, "_vmkeep_plain", False)
    ours = outcome(args)
    from typer import _coercion

    monkeypatch.setattr(core, "build_runtime_param", _coercion.build_runtime_param)
    assert ours == outcome(args)


def test_the_defaults_passed_through_are_the_plain_ones() -> None:
    code, _, values = outcome(["--low", "2"])
    assert code == 0
    assert values[0]["count"] == ("int", 3)
    assert values[0]["clamped"] == ("int", 20)  # out of range: typer's clamp ran
    assert values[0]["whole"] == ("float", 2.0)  # an int for a float: typer converted it
    assert values[0]["mode"] == ("str", "FULL")  # the parser ran


def test_a_local_list_imports_no_pydantic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every value of `list --remote PATH --json` is a plain one: typer's adapters (and
    pydantic, ~0.05 s of start-up) are never imported."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "repo"
    env = dict(os.environ, VMKEEP_DATA_DIR=str(tmp_path / "setup"), VMKEEP_PASSPHRASE="p")
    vmkeep = str(Path(sys.executable).with_name("vmkeep"))
    subprocess.run([vmkeep, "init", str(repo)], check=True, capture_output=True, env=env)
    monkeypatch.setenv("VMKEEP_PASSPHRASE", "p")
    code, modules, out = run_cli(tmp_path, "list", "--remote", str(repo), "--json")
    assert code == 0
    assert '"restore_points": []' in out
    assert loaded(modules, ("pydantic", "typer._adapters")) == []
