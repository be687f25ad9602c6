"""What the CLI prints: names from a VM directory or a remote never reach the terminal with
raw control characters (or break rich markup), --json failures are JSON too, exit codes
are documented and flags show as flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.stored_data import data_objects

from .conftest import Cli, one_error_line

EVIL = "web\x1b]0;pwned\x07\x1b[2J[/]\x9b31m\nfake line"


def _rename(vm: Path, name: str) -> None:
    doc = json.loads((vm / "vm.json").read_text())
    doc["name"] = name
    (vm / "vm.json").write_text(json.dumps(doc))


def _no_raw_controls(text: str) -> None:
    """No control character but newline and tab (the name's newline is shown as \\x0a; a
    table may still wrap there, so lines are checked only where no table is printed)."""
    raw = [c for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F]
    assert not raw, repr(text)


def test_control_characters_in_names_are_escaped(cli: Cli, repo_dir: Path, make_vm: Any) -> None:
    vm = make_vm()
    _rename(vm, EVIL)
    listed = cli("vm", "list", str(vm.parent))
    _no_raw_controls(listed.out + listed.err)
    assert "\\x1b]0;pwned\\x07" in listed.out.replace("\n", "").replace("│", "").replace(" ", "")
    assert [v["name"] for v in cli("vm", "list", str(vm.parent), "--json").json()] == [EVIL]

    backup = cli("backup", str(vm), "--remote", str(repo_dir))
    _no_raw_controls(backup.out + backup.err)
    points = cli("list", "--remote", str(repo_dir))
    _no_raw_controls(points.out + points.err)
    assert "pwned" in points.out
    listed_json = cli("list", "--remote", str(repo_dir), "--json").json()
    assert [p["vm"] for p in listed_json["restore_points"]] == [EVIL]  # JSON keeps it, escaped

    # An error that quotes the name: one line, escaped.
    run = cli("backup", str(vm), "--remote", str(repo_dir / "missing" / EVIL), ok=False)
    line = one_error_line(run)
    _no_raw_controls(run.err)
    assert "\\x1b" in line


def test_json_errors_are_json_on_stdout(cli: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "no-repo"
    run = cli("list", "--remote", str(missing), "--json", ok=False)
    line = one_error_line(run)
    doc = json.loads(run.out)
    assert doc == {"error": line.removeprefix("error: "), "exit_code": run.code}
    plain = cli("list", "--remote", str(missing), ok=False)
    assert plain.out == ""  # without --json, stdout stays empty
    usage = cli("list", "--json", "--no-such-option", ok=False)
    assert json.loads(usage.out)["exit_code"] == usage.code == 2


def test_verify_json_stays_one_document(cli: Cli, any_repo: Path, make_vm: Any) -> None:
    cli("backup", str(make_vm()), "--remote", str(any_repo))
    repo_dir = any_repo
    data_objects(repo_dir)[0].write_bytes(b"VMKC garbage")  # a chunk object, or a pack
    run = cli("verify", "--remote", str(repo_dir), "--json", ok=False)
    assert run.code == 3 and json.loads(run.out)["ok"] is False


def test_help_shows_flags_and_exit_codes(cli: Cli) -> None:
    top = cli("--help").out
    assert "70 internal" in top and "130 interrupted" in top
    for command in (("backup",), ("restore",), ("list",), ("vm", "list"), ("remote", "add")):
        out = cli(*command, "--help").out
        assert ("<bool>" not in out and "--json" in out) or command == ("remote", "add"), out
        assert "<bool>" not in out


def _command_rows(help_text: str) -> list[str]:
    """The lines of the Commands panel, between its top and bottom border."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Commands" in line and "╭" in line)
    end = next(i for i in range(start + 1, len(lines)) if "╰" in lines[i])
    return [line.strip("│ ") for line in lines[start + 1 : end]]


def test_command_summaries_are_not_broken_at_source_line_ends(cli: Cli) -> None:
    """Docstrings wrap at 95 columns; on a terminal wide enough, each command's summary is one
    row (it was cut where the docstring's line ended, e.g. `mount`'s before MOUNTPOINT)."""
    wide = {"COLUMNS": "400"}
    for group in ((), ("files",), ("job",), ("config",)):
        rows = _command_rows(cli(*group, "--help", env=wide).out)
        assert len(rows) >= 2, rows
        continued = [row for row in rows if row.startswith(" ") or not row.split()]
        assert not continued, rows
    top = _command_rows(cli("--help", env=wide).out)
    mount = next(row for row in top if row.startswith("mount "))
    assert "in MOUNTPOINT (FUSE)" in mount, mount
