"""Whoever can write the remote edits the repository `config` (issue 13 item 4): downgrade to
plaintext, another chunk size, a stripped or altered MAC, a replaced id. Every attempt ends
in one `error:` line before anything is written; the old restore point still restores."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Cli, Run, disk_hashes

KiB = 1024


def refused(run: Run) -> str:
    """One `error:` line on stderr, a non-zero exit that is not the internal error's 70."""
    assert run.code not in (0, 70), (run.code, run.err)
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.err
    return lines[0]


def objects(repo: Path) -> dict[str, bytes]:
    """Every data and manifest object (chunks/, or format 3's packs/ and index/), by name,
    with its bytes."""
    return {
        str(p.relative_to(repo)): p.read_bytes()
        for prefix in ("chunks", "packs", "index", "manifests")
        for p in sorted((repo / prefix).rglob("*"))
        if p.is_file()
    }


def known_plaintext(vm_dir: Path, count: int = 8) -> list[bytes]:
    """Distinctive 48-byte pieces of the demo disk (file system metadata and file data)."""
    data = (vm_dir / "disk0.raw").read_bytes()
    found: list[bytes] = []
    for offset in range(0, len(data), 1 << 20):
        piece = data[offset + 1024 : offset + 1072]
        if len(set(piece)) > 8 and piece not in found:
            found.append(piece)
    assert len(found) >= 2, "the demo disk has too little data to recognise"
    return found[:count]


def assert_nothing_plain(repo: Path, before: dict[str, bytes], samples: list[bytes]) -> None:
    """No object was added or changed, every object's header says encrypted, and no object
    holds any known plaintext of the disk."""
    after = objects(repo)
    assert after == before
    for name, blob in after.items():
        assert blob[5] & 0x02, f"{name} is not encrypted"
        assert not any(s in blob for s in samples), f"{name} holds plaintext"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A demo VM and an encrypted repository holding one point of it, made once per module
    (each test works on its own copy)."""
    from vmkeep.connectors.files.demo import create_demo_vm

    root = tmp_path_factory.mktemp("template")
    vm_dir = Path(create_demo_vm(root, "web01", 32 * 1024 * 1024, "raw"))
    runner = Cli(root)
    runner("init", str(root / "repo"))
    point = runner("backup", str(vm_dir), "--remote", str(root / "repo"), "--json").json()
    return root, point["restore_point"]


@pytest.fixture
def backed_up(cli: Cli, template: tuple[Path, str], tmp_path: Path) -> dict[str, Any]:
    """A copy of the template behind the named remote `nas` (added as an existing repository:
    the client records what it is)."""
    root, point = template
    vm_dir, repo = tmp_path / "web01", tmp_path / "repo"
    shutil.copytree(root / "web01", vm_dir)
    shutil.copytree(root / "repo", repo)
    cli("remote", "add", "nas", str(repo))
    config = repo / "config"
    return {
        "vm": vm_dir,
        "repo": repo,
        "point": point,
        "config": config,
        "original": config.read_bytes(),
        "hashes": disk_hashes(vm_dir),
        "samples": known_plaintext(vm_dir),
    }


def tamper(config: Path, **changes: Any) -> None:
    """Rewrite `config` as an attacker would; a value of None deletes the key."""
    doc = json.loads(config.read_bytes())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    config.write_text(json.dumps(doc, indent=1))


def restores_hash_equal(cli: Cli, case: dict[str, Any], remote: str, out: Path) -> None:
    res = cli("restore", case["point"], "--remote", remote, "--to", str(out), "--json").json()
    assert disk_hashes(Path(res["location"])) == case["hashes"]


DOWNGRADES = {
    "encryption none": {"encryption": "none"},
    "none, keys and mac gone": {"encryption": "none", "keys": [], "mac": None},
    "none, everything of an unencrypted config": {
        "encryption": "none",
        "keys": [],
        "mac": None,
        "chunk_id": "blake3",
    },
    "chunk size 1 MiB": {"version": 2, "chunk_size": 1024 * KiB},
    "chunk size 1 MiB, mac gone": {"version": 2, "chunk_size": 1024 * KiB, "mac": None},
    "mac gone": {"mac": None},
    "mac altered": {"mac": "0" * 64},
    "mac not a string": {"mac": 5},
    "id replaced": {"id": "0" * 32},
}


@pytest.mark.parametrize("changes", DOWNGRADES.values(), ids=DOWNGRADES.keys())
@pytest.mark.parametrize("remote", ["named", "path"])
def test_tampered_config_is_refused_and_nothing_is_written(
    cli: Cli, backed_up: dict[str, Any], tmp_path: Path, remote: str, changes: dict[str, Any]
) -> None:
    """Through a named remote (the client remembers the repository) and a bare path (the MAC
    and the existing manifests are all there is): refused either way. Only the stripped MAC
    of an unchanged config passes by path: it is the pre-version-3 form, upgraded again."""
    case = backed_up
    ref = "nas" if remote == "named" else str(case["repo"])
    before = objects(case["repo"])
    tamper(case["config"], **changes)
    if remote == "path" and changes == {"mac": None}:
        cli("backup", str(case["vm"]), "--remote", ref, "--compression-level", "0")
        assert json.loads(case["config"].read_bytes())["mac"]  # authenticated again
        return
    for args in (
        ("backup", str(case["vm"]), "--remote", ref, "--compression-level", "0"),
        ("list", "--remote", ref),
    ):
        line = refused(cli(*args, ok=False))
        assert "passphrase" in line or "config" in line or "altered" in line, line
    assert_nothing_plain(case["repo"], before, case["samples"])
    case["config"].write_bytes(case["original"])
    restores_hash_equal(cli, case, ref, tmp_path / "out")


def test_unencrypted_repository_chunk_size_change_is_refused(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    """No MAC is possible without a key: the remote's record and the manifests catch it."""
    vm_dir = make_vm("db01", 32 * 1024 * 1024)
    repo = tmp_path / "plain"
    cli("remote", "add", "plain", str(repo), "--encryption", "none", "--chunk-size", "256K")
    point = cli("backup", str(vm_dir), "--remote", "plain", "--json").json()["restore_point"]
    original = (repo / "config").read_bytes()
    before = objects(repo)
    tamper(repo / "config", version=1, chunk_size=4096 * KiB)
    for ref in ("plain", str(repo)):
        line = refused(cli("backup", str(vm_dir), "--remote", ref, ok=False))
        assert "chunk" in line, line
    assert objects(repo) == before
    (repo / "config").write_bytes(original)
    res = cli("restore", point, "--remote", "plain", "--to", str(tmp_path / "o"), "--json")
    assert disk_hashes(Path(res.json()["location"])) == disk_hashes(vm_dir)


def test_plaintext_manifests_under_an_encrypted_config_are_refused(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    """The reverse: an unencrypted repository whose config was given someone else's keys."""
    vm_dir = make_vm("app01", 32 * 1024 * 1024)
    plain, other = tmp_path / "plain", tmp_path / "other"
    cli("init", str(plain), "--encryption", "none")
    cli("init", str(other))
    cli("backup", str(vm_dir), "--remote", str(plain))
    before = objects(plain)
    foreign = json.loads((other / "config").read_bytes())
    (plain / "config").write_text(json.dumps(foreign))
    line = refused(cli("backup", str(vm_dir), "--remote", str(plain), ok=False))
    assert "unencrypted but the repository config says encrypted" in line, line
    assert objects(plain) == before


def test_remote_add_records_the_repository_and_old_entries_learn_it(
    cli: Cli, backed_up: dict[str, Any], tmp_path: Path
) -> None:
    case = backed_up
    config = json.loads(case["original"])
    expected = {
        "id": config["id"],
        "encrypted": True,
        "chunk_size": 4096 * KiB,
        "authenticated": True,
    }
    assert _recorded(Path(cli.env["VMKEEP_DATA_DIR"]), "nas") == expected
    # An entry written by an older vmkeep (remotes.json, no record), imported into a new data
    # directory: the first open makes the record.
    old_home = tmp_path / "older"
    (old_home / "config").mkdir(parents=True)
    (old_home / "config" / "remotes.json").write_text(
        json.dumps({"remotes": [{"name": "nas", "location": str(case["repo"])}]})
    )
    env = {"VMKEEP_CONFIG_DIR": str(old_home / "config"), "VMKEEP_DATA_DIR": str(old_home / "data")}
    cli("list", "--remote", "nas", env=env)
    assert _recorded(old_home / "data", "nas") == expected


def _recorded(data_dir: Path, name: str) -> dict[str, Any] | None:
    """The repository record the state database holds for remote `name`."""
    from vmkeep.engine.state import DbRemoteRegistry, StateDB

    db = StateDB.open(data_dir)
    try:
        entry = DbRemoteRegistry(db).entry(name)
        assert entry is not None
        return entry.repository.model_dump() if entry.repository else None
    finally:
        db.close()


def test_a_config_without_mac_is_upgraded_once_and_then_checked(
    cli: Cli, backed_up: dict[str, Any], tmp_path: Path
) -> None:
    """A repository made before version 3: the first open with the passphrase adds the MAC
    (the rest of the config unchanged); from then on, a change is refused."""
    case = backed_up
    original = json.loads(case["original"])
    tamper(case["config"], mac=None)
    cli("list", "--remote", str(case["repo"]))
    upgraded = json.loads(case["config"].read_bytes())
    assert upgraded == original  # the same MAC again: the same key, the same covered keys
    tamper(case["config"], encryption="none")
    refused(cli("list", "--remote", str(case["repo"]), ok=False))


def test_key_add_and_remove_keep_the_mac_valid(
    cli: Cli, backed_up: dict[str, Any], tmp_path: Path
) -> None:
    """`keys` is not covered by the MAC: adding and removing a passphrase keeps it valid."""
    case = backed_up
    second = tmp_path / "second"
    second.write_text("a second passphrase")
    cli("key", "add", "--remote", "nas", "--new-passphrase-file", str(second))
    mac = json.loads(case["original"])["mac"]
    assert json.loads(case["config"].read_bytes())["mac"] == mac
    cli("--passphrase-file", str(second), "list", "--remote", "nas")
    restores_hash_equal(cli, case, "nas", tmp_path / "out")
