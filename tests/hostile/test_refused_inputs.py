"""Inputs that made an unrestorable point or an internal error (exit 70) are refused in one
line before anything is written (issue 13 item 6): deep VM metadata, malformed key material,
hostile manifests and locks, missing and empty passphrases."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import VMKEEP, Cli, Run, disk_hashes
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.compression import compress
from vmkeep.repository.crypto import Sealer
from vmkeep.repository.format import FLAG_ZSTD, MANIFEST_MAGIC, header, manifest_object_name
from vmkeep.repository.manifest import new_point_id
from vmkeep.repository.repository import Repository

from .test_config_tampering import objects, refused

KiB = 1024


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def set_metadata(vm_dir: Path, raw_json: str) -> None:
    """vm.json with `raw_json` as its metadata's value of key "x", written as text (a nesting
    Python's json cannot even write)."""
    doc = json.loads((vm_dir / "vm.json").read_text())
    doc["metadata"]["x"] = "@@"
    (vm_dir / "vm.json").write_text(json.dumps(doc).replace('"@@"', raw_json))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (nested(40), "nested deeper than 32 levels"),
        (nested(900), "nested deeper than 32 levels"),
        (nested(5000), "nested too deeply"),
        (json.dumps("x" * (2 << 20)), "larger than 1024 KiB"),
    ],
    ids=["depth-40", "depth-900", "depth-5000", "2MiB"],
)
def test_metadata_out_of_bounds_is_refused_at_backup(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path, raw: str, message: str
) -> None:
    vm_dir = make_vm("meta", 32 * 1024 * 1024)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    before = sorted(repo.rglob("*"))
    set_metadata(vm_dir, raw)
    line = refused(cli("backup", str(vm_dir), "--remote", str(repo), ok=False))
    assert message in line, line
    assert sorted(repo.rglob("*")) == before  # not a chunk, a manifest, nor a lock


def test_metadata_at_the_bound_backs_up_and_restores(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    vm_dir = make_vm("meta", 32 * 1024 * 1024)
    cli("init", str(tmp_path / "repo"))
    set_metadata(vm_dir, nested(31))  # + the metadata object itself: 32 levels
    point = cli("backup", str(vm_dir), "-r", str(tmp_path / "repo"), "--json").json()
    out = cli(
        "restore",
        point["restore_point"],
        "-r",
        str(tmp_path / "repo"),
        "--to",
        str(tmp_path / "out"),
        "--json",
    ).json()
    restored = Path(out["location"])
    assert json.loads((restored / "vm.json").read_text())["metadata"]["x"] == json.loads(nested(31))
    assert disk_hashes(restored) == disk_hashes(vm_dir)


def test_a_point_with_deep_metadata_from_an_older_vmkeep_restores_without_it(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    """The point exists (an older vmkeep wrote it): restore must not fail with exit 70."""
    vm_dir = make_vm("old", 32 * 1024 * 1024)
    repo_dir = tmp_path / "repo"
    cli("init", str(repo_dir))
    point = cli("backup", str(vm_dir), "-r", str(repo_dir), "--json").json()["restore_point"]
    repo = Repository.open(LocalRemote(repo_dir), lambda: b"e2e passphrase")
    manifest = repo.load_manifest(point)
    manifest.vm["metadata"] = {"x": json.loads(nested(500))}
    manifest.id = new_point_id(datetime.now(UTC))
    repo.save_manifest(manifest)  # what backup wrote before the bound
    run = cli("restore", manifest.id, "-r", str(repo_dir), "--to", str(tmp_path / "o"), "--json")
    restored = Path(run.json()["location"])
    assert "restored without it" in run.err
    assert disk_hashes(restored) == disk_hashes(vm_dir)
    assert json.loads((restored / "vm.json").read_text())["metadata"] == {}


KEY_DAMAGE: dict[str, Callable[[dict[str, Any]], None]] = {
    "salt 3 bytes": lambda c: c["keys"][0].update(salt="AAAA"),
    "salt empty": lambda c: c["keys"][0].update(salt=""),
    "salt 64 bytes": lambda c: c["keys"][0].update(salt="A" * 88),
    "salt a number": lambda c: c["keys"][0].update(salt=5),
    "nonce 3 bytes": lambda c: c["keys"][0].update(nonce="AAAA"),
    "nonce empty": lambda c: c["keys"][0].update(nonce=""),
    "nonce not base64": lambda c: c["keys"][0].update(nonce="!!!!"),
    "wrapped short": lambda c: c["keys"][0].update(wrapped="AAAA"),
    "wrapped null": lambda c: c["keys"][0].update(wrapped=None),
    "time_cost float": lambda c: c["keys"][0].update(time_cost=3.5),
    "time_cost bool": lambda c: c["keys"][0].update(time_cost=True),
    "memory_kib string": lambda c: c["keys"][0].update(memory_kib="65536"),
    "memory_kib huge": lambda c: c["keys"][0].update(memory_kib=1 << 40),
    "entry a string": lambda c: c.update(keys=["x"]),
    "entry a list": lambda c: c.update(keys=[[1]]),
    "keys an object": lambda c: c.update(keys={"a": 1}),
    "a thousand keys": lambda c: c.update(keys=c["keys"] * 1000),
    "id huge": lambda c: c.update(id="x" * 100000),
    "id a number": lambda c: c.update(id=5),
    "version float": lambda c: c.update(version=1.0),
    "chunk_id unknown": lambda c: c.update(chunk_id="sha1"),
}


@pytest.mark.parametrize("damage", KEY_DAMAGE.values(), ids=KEY_DAMAGE.keys())
def test_malformed_key_material_is_refused_in_one_line(
    cli: Cli, tmp_path: Path, damage: Callable[[dict[str, Any]], None]
) -> None:
    repo = tmp_path / "repo"
    cli("init", str(repo))
    config = json.loads((repo / "config").read_bytes())
    damage(config)
    (repo / "config").write_text(json.dumps(config))
    for args in (("list", "-r", str(repo)), ("key", "list", "-r", str(repo))):
        refused(cli(*args, ok=False, timeout=60))
    assert objects(repo) == {}


def test_a_key_entry_of_an_unknown_kdf_is_listed_not_computed(cli: Cli, tmp_path: Path) -> None:
    """Open skips entries of a KDF it does not know (a later version's): `key list` shows them
    without arithmetic on their unchecked fields."""
    repo = tmp_path / "repo"
    cli("init", str(repo))
    config = json.loads((repo / "config").read_bytes())
    config["keys"].append({"id": "later", "kdf": "scrypt", "memory_kib": "lots", "label": 5})
    (repo / "config").write_text(json.dumps(config))
    listed = cli("key", "list", "-r", str(repo), "--json").json()
    assert [k["id"] for k in listed] == [config["keys"][0]["id"], "later"]
    assert "later" in cli("key", "list", "-r", str(repo)).out


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100000,
        b'{"format":"vmkeep-repository","x":' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"\xff\xfe\x00",
        b"",
        b"null",
        b"[]",
    ],
    ids=["open-brackets", "deep", "binary", "empty", "null", "list"],
)
def test_unparseable_config_is_refused_in_one_line(cli: Cli, tmp_path: Path, raw: bytes) -> None:
    repo = tmp_path / "repo"
    cli("init", str(repo))
    (repo / "config").write_bytes(raw)
    assert "config" in refused(cli("list", "-r", str(repo), ok=False))


def run_with_stdin(cli: Cli, args: list[str], env: dict[str, str], closed: bool) -> Run:
    """`vmkeep ARGS` with stdin closed (fd 0 not open at all) or /dev/null, and no
    VMKEEP_PASSPHRASE unless `env` gives one."""
    base = {k: v for k, v in cli.env.items() if k != "VMKEEP_PASSPHRASE"}
    proc = subprocess.run(
        [VMKEEP, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(base, **env),
        stdin=None if closed else subprocess.DEVNULL,
        preexec_fn=(lambda: os.close(0)) if closed else None,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize("closed", [True, False], ids=["stdin-closed", "stdin-devnull"])
def test_no_passphrase_source_is_a_usage_error(cli: Cli, tmp_path: Path, closed: bool) -> None:
    cli("init", str(tmp_path / "repo"))
    for args in (["list", "-r", str(tmp_path / "repo")], ["init", str(tmp_path / "new")]):
        line = refused(run_with_stdin(cli, args, {}, closed))
        assert "no passphrase" in line, line
    assert not (tmp_path / "new").exists()


def test_an_empty_passphrase_is_refused_from_every_source(cli: Cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")  # a file with just a newline is empty too
    sources: list[tuple[list[str], dict[str, str]]] = [
        ([], {"VMKEEP_PASSPHRASE": ""}),
        (["--passphrase-file", str(empty)], {}),
    ]
    for prefix, env in sources:
        new = str(tmp_path / "new")
        for args in (["init", new], ["remote", "add", "n", new]):
            line = refused(run_with_stdin(cli, [*prefix, *args], env, closed=False))
            assert "empty passphrase" in line, line
            assert not (tmp_path / "new" / "config").exists()
    cli("init", str(tmp_path / "repo"))
    before = (tmp_path / "repo" / "config").read_bytes()
    line = refused(
        cli(
            "key",
            "add",
            "-r",
            str(tmp_path / "repo"),
            "--new-passphrase-file",
            str(empty),
            ok=False,
        )
    )
    assert "empty passphrase" in line and (tmp_path / "repo" / "config").read_bytes() == before


def test_a_passphrase_that_is_not_utf8_works(cli: Cli, tmp_path: Path) -> None:
    """Environment bytes that are not UTF-8 are the passphrase as given (was exit 70)."""
    env = {"VMKEEP_PASSPHRASE": os.fsdecode(b"\xffpass\xfe")}
    cli("init", str(tmp_path / "repo"), env=env)
    cli("list", "-r", str(tmp_path / "repo"), env=env)
    refused(cli("list", "-r", str(tmp_path / "repo"), ok=False))  # the e2e passphrase


def write_lock(repo: Path, refreshed: object, host: str = "elsewhere.example") -> None:
    doc = {
        "kind": "exclusive",
        "scope": "",
        "host": host,
        "pid": 4242,
        "operation": "gc",
        "refreshed": refreshed,
    }
    (repo / "locks").mkdir(exist_ok=True)
    (repo / "locks" / f"exclusive-{uuid.uuid4().hex[:16]}").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "refreshed",
    [time.time() + 10 * 365 * 86400, 1e308, float("nan"), float("inf"), -1e308, "soon", 10**400],
    ids=["ten-years-ahead", "1e308", "nan", "inf", "-1e308", "string", "overflow"],
)
def test_a_lock_from_the_far_future_does_not_block_backups(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path, refreshed: object
) -> None:
    vm_dir = make_vm("locked", 32 * 1024 * 1024)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    write_lock(repo, refreshed)
    cli("backup", str(vm_dir), "-r", str(repo))
    assert len(list((repo / "manifests").iterdir())) == 1


def test_a_live_lock_slightly_ahead_still_blocks(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    """A clock a minute ahead is within the lease: that lock is alive and respected."""
    vm_dir = make_vm("locked", 32 * 1024 * 1024)
    repo = tmp_path / "repo"
    cli("init", str(repo))
    write_lock(repo, time.time() + 60)
    assert "busy" in refused(cli("backup", str(vm_dir), "-r", str(repo), ok=False))
    # this host's name with a pid no process can have: stale at once
    (repo / "locks").joinpath(next(iter(os.listdir(repo / "locks")))).unlink()
    write_lock(repo, time.time(), host=socket.gethostname())
    doc_path = next((repo / "locks").iterdir())
    doc = json.loads(doc_path.read_text())
    doc["pid"] = -1
    doc_path.write_text(json.dumps(doc))
    cli("backup", str(vm_dir), "-r", str(repo))


def forge(repo_dir: Path, doc_for: Callable[[str], object]) -> str:
    """An unencrypted repository's manifest: anyone can compute its checksum."""
    point = new_point_id(datetime.now(UTC))
    made = doc_for(point)
    raw = made if isinstance(made, bytes) else json.dumps(made).encode()
    head = header(MANIFEST_MAGIC, FLAG_ZSTD)
    blob = Sealer(None).seal(head, compress(raw, 1), head + manifest_object_name(point).encode())
    LocalRemote(repo_dir).put(manifest_object_name(point), blob)
    return point


def good_doc(repo_dir: Path, point: str) -> dict[str, Any]:
    repo = Repository.open(LocalRemote(repo_dir), lambda: b"")
    return repo.load_manifest(point).to_json()


MANIFEST_DAMAGE: dict[str, Callable[[dict[str, Any]], object]] = {
    "stats a string": lambda d: {**d, "stats": {"bytes_written": "lots"}},
    "created naive": lambda d: {**d, "created": "2026-01-01T00:00:00"},
    "created a number": lambda d: {**d, "created": 5},
    "vm a list": lambda d: {**d, "vm": [["name", "x"]]},
    "vcpus a string": lambda d: {**d, "vm": {**d["vm"], "vcpus": "many"}},
    "metadata a list": lambda d: {**d, "vm": {**d["vm"], "metadata": [1]}},
    "disk a number": lambda d: {**d, "disks": [5]},
    "disk size a string": lambda d: {**d, "disks": [{**d["disks"][0], "size": "1"}]},
    "tags a string": lambda d: {**d, "tags": "abc"},
    "parent a number": lambda d: {**d, "parent": 7},
    "document a list": lambda d: [d],
    "lock until naive": lambda d: {**d, "lock": {"mode": "compliance", "until": "2030-01-01"}},
    "deep": lambda d: ('{"a":' * 50000 + "1" + "}" * 50000).encode(),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE.values(), ids=MANIFEST_DAMAGE.keys())
def test_malformed_manifests_are_unreadable_points_not_internal_errors(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path, damage: Callable[..., object]
) -> None:
    vm_dir = make_vm("forged", 32 * 1024 * 1024)
    repo = tmp_path / "repo"
    cli("init", str(repo), "--encryption", "none")
    good = cli("backup", str(vm_dir), "-r", str(repo), "--json").json()["restore_point"]
    doc = good_doc(repo, good)
    bad = forge(repo, lambda point: damage({**doc, "id": point}))
    listing = cli("list", "-r", str(repo), "--json").json()
    assert [p["restore_point"] for p in listing["restore_points"]] == [good]
    assert [p["point_id"] for p in listing["unreadable"]] == [bad]
    line = refused(cli("restore", bad, "-r", str(repo), "--to", str(tmp_path / "o"), ok=False))
    assert "manifest" in line, line
    cli("backup", str(vm_dir), "-r", str(repo))  # the good history still works
    res = cli("restore", good, "-r", str(repo), "--to", str(tmp_path / "o2"), "--json").json()
    assert disk_hashes(Path(res["location"])) == disk_hashes(vm_dir)
