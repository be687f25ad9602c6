"""Metadata backup against real parts: SQLite state databases in two data directories, local
repositories (encrypted and not), the real gc, and libvirt's in-process test driver."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from vmkeep.engine.metadata import apply_config, configured, gather_config
from vmkeep.engine.state import (
    DbRemoteRegistry,
    JobStore,
    ScheduleSpec,
    SecretStore,
    StateDB,
)
from vmkeep.errors import IntegrityError, UsageError, WrongPassphraseError
from vmkeep.operations.hypervisor_metadata import (
    HypervisorMetadata,
    LibvirtObject,
    collect_libvirt,
)
from vmkeep.operations.metadata_backup import backup_metadata, list_metadata, read_metadata
from vmkeep.operations.retention import RetentionPolicy
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.gc import collect_garbage
from vmkeep.repository.metadata_objects import (
    decode_metadata,
    load_metadata,
    metadata_ids,
    metadata_object_name,
)
from vmkeep.repository.repository import Repository

REPO_PASS = b"repository passphrase"
META_PASS = b"metadata passphrase"
SECRET = b"s3-secret-KEY-\x00\xffZ9q"  # binary on purpose: equal bytes must come back


def make_repo(path: Path, encryption: str = "aes-256-gcm") -> Repository:
    return Repository.init(LocalRemote(str(path)), encryption, lambda: REPO_PASS)


def open_repo(path: Path) -> Repository:
    return Repository.open(LocalRemote(str(path)), lambda: REPO_PASS)


@pytest.fixture
def source(tmp_path: Path) -> StateDB:
    """Two remotes (one encrypted, one not), a job with two schedules, two secrets."""
    db = StateDB.open(tmp_path / "data-old")
    registry = DbRemoteRegistry(db, tmp_path / "no-remotes.json")
    for name, enc in (("nas", "aes-256-gcm"), ("plain", "none")):
        repo = make_repo(tmp_path / name, enc)
        registry.add(name, str(tmp_path / name), repository=repo.known)
    JobStore(db).put_job(
        "nightly",
        "backup",
        {"kind": "backup", "remotes": ["nas", "plain"], "mode": "delta"},
        [
            ScheduleSpec("daily", "0 2 * * *", "Europe/Paris", keep=7),
            ScheduleSpec("hourly", "5 8-18 * * 1-5", "UTC", enabled=False, overlap_policy="queue"),
        ],
    )
    store = SecretStore(db)
    store.put_secret("remote.nas.passphrase", REPO_PASS)
    store.put_secret("remote.s3.secret_key", SECRET)
    return db


def test_restore_into_a_fresh_data_dir_brings_everything_back(
    source: StateDB, tmp_path: Path
) -> None:
    repo = open_repo(tmp_path / "nas")
    result = backup_metadata(repo, gather_config(source), META_PASS)
    assert metadata_ids(repo) == [result.point_id]

    fresh = StateDB.open(tmp_path / "data-new")
    assert not any(configured(fresh).values())
    doc = read_metadata(open_repo(tmp_path / "nas"), result.point_id)
    apply_config(fresh, doc.snapshot(META_PASS))

    old_remotes = DbRemoteRegistry(source, tmp_path / "x.json").load()
    new_remotes = DbRemoteRegistry(fresh, tmp_path / "x.json").load()
    assert [r.model_dump() for r in new_remotes] == [r.model_dump() for r in old_remotes]
    assert new_remotes[0].repository is not None  # the record check_known compares with
    old_job, new_job = JobStore(source).get_job("nightly"), JobStore(fresh).get_job("nightly")
    assert (new_job.kind, new_job.spec) == (old_job.kind, old_job.spec)
    fields = ("name", "cron", "timezone", "enabled", "missed_policy", "overlap_policy", "keep")
    assert [[getattr(s, f) for f in fields] for s in new_job.schedules] == [
        [getattr(s, f) for f in fields] for s in old_job.schedules
    ]
    assert len(new_job.schedules) == 2
    store = SecretStore(fresh)
    assert store.list_secrets() == ["remote.nas.passphrase", "remote.s3.secret_key"]
    assert store.get_secret("remote.s3.secret_key") == SECRET
    # re-encrypted under the new server key, which is not the old one
    old_key = (source.directory / "server.key").read_bytes()
    assert (fresh.directory / "server.key").read_bytes() != old_key


def test_a_named_remote_opens_again_after_restore(source: StateDB, tmp_path: Path) -> None:
    """The restored registry resolves the remote and its repository record still matches."""
    backup_metadata(open_repo(tmp_path / "nas"), gather_config(source), META_PASS)
    fresh = StateDB.open(tmp_path / "data-new")
    repo = open_repo(tmp_path / "nas")
    apply_config(fresh, read_metadata(repo, metadata_ids(repo)[-1]).snapshot(META_PASS))
    registry = DbRemoteRegistry(fresh, tmp_path / "x.json")
    entry = registry.entry("nas")
    assert entry is not None and entry.repository is not None
    remote = LocalRemote(registry.resolve("nas"))
    Repository.open(remote, lambda: REPO_PASS, entry.repository.known())  # check_known passes


def test_wrong_metadata_passphrase_is_refused_and_nothing_is_written(
    source: StateDB, tmp_path: Path
) -> None:
    repo = open_repo(tmp_path / "plain")  # unencrypted: only the metadata passphrase guards
    point = backup_metadata(repo, gather_config(source), META_PASS).point_id
    doc = read_metadata(repo, point)
    with pytest.raises(WrongPassphraseError, match="wrong metadata passphrase"):
        doc.snapshot(b"not it")
    fresh = StateDB.open(tmp_path / "data-new")
    assert not any(configured(fresh).values())


def test_a_configured_data_dir_is_refused_unless_forced(source: StateDB, tmp_path: Path) -> None:
    repo = open_repo(tmp_path / "nas")
    point = backup_metadata(repo, gather_config(source), META_PASS).point_id
    snapshot = read_metadata(repo, point).snapshot(META_PASS)
    target = StateDB.open(tmp_path / "data-new")
    JobStore(target).put_job("other", "backup", {})
    with pytest.raises(UsageError, match="not empty"):
        apply_config(target, snapshot)
    assert [j.name for j in JobStore(target).list_jobs()] == ["other"]
    apply_config(target, snapshot, force=True)
    assert [j.name for j in JobStore(target).list_jobs()] == ["nightly"]


def test_retention_keeps_the_last_n(source: StateDB, tmp_path: Path) -> None:
    repo = open_repo(tmp_path / "nas")
    snapshot = gather_config(source)
    made = []
    for _ in range(5):
        made.append(
            backup_metadata(repo, snapshot, META_PASS, retention=RetentionPolicy(keep_last=3))
        )
        time.sleep(0.003)  # distinct milliseconds: ids sort in creation order
    assert metadata_ids(repo) == [r.point_id for r in made[-3:]]
    assert made[-1].pruned == [made[1].point_id]
    assert not (tmp_path / "nas" / metadata_object_name(made[0].point_id)).exists()


def test_gc_leaves_metadata_points_alone(source: StateDB, tmp_path: Path) -> None:
    repo = open_repo(tmp_path / "nas")
    point = backup_metadata(repo, gather_config(source), META_PASS).point_id
    leftover = tmp_path / "nas" / "metadata" / ".tmp-1-dead"
    leftover.write_bytes(b"x")
    os.utime(leftover, (1, 1))
    report = collect_garbage(repo, SilentProgress())
    assert report.partial_objects_removed == 1  # metadata/ is a layout directory
    assert not leftover.exists()
    assert metadata_ids(repo) == [point]
    assert read_metadata(repo, point).point.jobs == ["nightly"]


@pytest.mark.parametrize("remote", ["nas", "plain"])
def test_no_plaintext_secret_on_the_remote(source: StateDB, tmp_path: Path, remote: str) -> None:
    repo = open_repo(tmp_path / remote)
    point = backup_metadata(repo, gather_config(source), META_PASS).point_id
    for path in (tmp_path / remote).rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_bytes()
            assert REPO_PASS not in path.read_bytes()
    # even the decoded document (zstd hides nothing) holds the secrets only sealed
    text = json.dumps(load_metadata(repo, point))
    for value in (SECRET, REPO_PASS):
        assert value.decode("latin-1") not in text
        assert __import__("base64").b64encode(value).decode() not in text


def test_a_tampered_or_renamed_point_does_not_verify(source: StateDB, tmp_path: Path) -> None:
    repo = open_repo(tmp_path / "plain")
    point = backup_metadata(repo, gather_config(source), META_PASS).point_id
    path = tmp_path / "plain" / metadata_object_name(point)
    blob = bytearray(path.read_bytes())
    with pytest.raises(IntegrityError):
        decode_metadata(repo, "20200101T000000.000Z-000000", bytes(blob))  # renamed
    blob[40] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        read_metadata(repo, point)
    points, problems = list_metadata(repo)
    assert points == [] and [p for p, _ in problems] == [point]


def test_libvirt_xml_round_trips(source: StateDB, tmp_path: Path) -> None:
    xml = "<domain type='kvm'>\n  <name>db01</name>\n  <title>é &amp; ü</title>\n</domain>\n"
    hyper = HypervisorMetadata(
        "qemu:///system",
        [
            LibvirtObject("domain", "db01", "6695eb01-f6a4-8304-79aa-97f2502e193f", xml),
            LibvirtObject("network", "default", "a" * 8, "<network><name>default</name></network>"),
            LibvirtObject("pool", "images", "b" * 8, "<pool type='dir'><name>images</name></pool>"),
        ],
    )
    repo = open_repo(tmp_path / "nas")
    point = backup_metadata(repo, gather_config(source), META_PASS, [hyper]).point_id
    doc = read_metadata(repo, point)
    assert doc.hypervisors == [hyper]
    assert doc.point.hypervisors == ["qemu:///system"]
    assert doc.hypervisors[0].counts() == {"domain": 1, "network": 1, "pool": 1}


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "xen", "uri": "x", "objects": []},
        {"type": "libvirt", "uri": "x", "objects": [{"kind": "volume", "name": "a"}]},
        {
            "type": "libvirt",
            "uri": "x",
            "objects": [{"kind": "domain", "name": 1, "uuid": "", "xml": ""}],
        },
    ],
)
def test_malformed_libvirt_metadata_is_one_error(bad: dict[str, object]) -> None:
    with pytest.raises(IntegrityError, match="hypervisors"):
        HypervisorMetadata.from_json(bad, "p")


def test_collect_from_libvirts_test_driver() -> None:
    pytest.importorskip("libvirt", reason="libvirt-python is not installed")
    hyper = collect_libvirt("test:///default")
    assert hyper.counts() == {"domain": 1, "network": 1, "pool": 1}
    domain = next(o for o in hyper.objects if o.kind == "domain")
    assert domain.name == "test" and "<name>test</name>" in domain.xml
