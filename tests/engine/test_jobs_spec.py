"""Job files: every kind loads, exports and loads back equal; each bad input is one line naming
the file, the line and the field."""

from __future__ import annotations

import pytest

from tests.engine.jobs_examples import ALL_KINDS, REMOTES
from vmkeep.engine.jobs.load import JobSpecError, dump_jobs, load_jobs
from vmkeep.engine.jobs.spec import (
    BackupJob,
    MirrorJob,
    SequenceJob,
    job_from_dict,
    job_to_dict,
)
from vmkeep.engine.jobs.units import format_duration, parse_duration, parse_rate


def _load(text: str, **kw: object) -> list[object]:
    return list(load_jobs(text, "jobs.yaml", remotes=REMOTES, **kw))  # type: ignore[arg-type]


def _error(text: str, **kw: object) -> str:
    with pytest.raises(JobSpecError) as caught:
        _load(text, **kw)
    message = str(caught.value)
    assert "\n" not in message
    assert "Traceback" not in message
    return message


def test_every_kind_loads_with_its_values() -> None:
    jobs = _load(ALL_KINDS)
    assert [j.kind for j in jobs] == ["backup", "replication", "mirror", "metadata", "sequence"]  # type: ignore[attr-defined]
    backup = jobs[0]
    assert isinstance(backup, BackupJob)
    assert backup.max_rate == 50 * 1024 * 1024
    assert backup.vm_timeout == 7200
    assert backup.retries.backoff == 300
    assert backup.schedules[0].keep == 7 and backup.schedules[0].timezone == "Europe/Paris"
    assert backup.schedules[1].missed == "skip" and backup.schedules[1].overlap == "queue"
    assert backup.connector.type == "files" and backup.connector.root == "/srv/vms"
    assert [r.name for r in backup.vms.include] == ["web*", None]
    assert backup.concurrency.per_remote == 3
    replication = jobs[1]
    assert replication.vms.include[0].name == "db01"  # type: ignore[attr-defined]
    mirror = jobs[2]
    assert isinstance(mirror, MirrorJob) and mirror.max_rate == 10_000_000
    assert mirror.retention is not None and mirror.retention.keep_last == 14
    sequence = jobs[4]
    assert isinstance(sequence, SequenceJob) and sequence.on_failure == "continue"
    assert sequence.schedules[0].enabled is False


def test_export_loads_back_equal_and_is_stable() -> None:
    jobs = _load(ALL_KINDS)
    exported = dump_jobs(jobs)  # type: ignore[arg-type]
    again = _load(exported)
    assert again == jobs
    assert dump_jobs(again) == exported  # type: ignore[arg-type]
    first = exported.split("---\n")[1].splitlines()
    assert first[:2] == ["kind: backup", "name: nightly"]
    assert "max_rate: 50MiB/s" in exported and "vm_timeout: 2h" in exported
    assert "backoff: 5m" in exported


def test_json_form_for_the_state_store_round_trips() -> None:
    for job in _load(ALL_KINDS):
        assert job_from_dict(job_to_dict(job)) == job  # type: ignore[arg-type]


def test_defaults_are_filled_and_left_out_of_the_export() -> None:
    text = """\
kind: backup
name: small
remotes: [nas]
connector: {type: libvirt}
vms: ["*"]
"""
    (job,) = _load(text)
    assert isinstance(job, BackupJob)
    assert job.mode == "delta" and job.compression_level == 1 and job.concurrency.vms == 2
    assert job.connector.type == "libvirt" and job.connector.uri == "qemu:///system"
    assert job.report.when == "failure" and job.max_rate is None
    assert dump_jobs([job]) == (
        "---\nkind: backup\nname: small\nremotes:\n- nas\nconnector:\n  type: libvirt\n"
        "vms:\n  include:\n  - name: '*'\n"
    )


BAD = [
    # (replace this, with that, expected line, expected text in the message)
    ('cron: "5 * * * *"', "cron: 5", 23, "backup 'nightly': schedules[1].cron: must be a string"),
    ("    keep: 7\n", "    kep: 7\n", 21, "schedules[0].kep: unknown key"),
    ("gc: true", "gc: true\nbogus: 1", 30, "backup 'nightly': bogus: unknown key"),
    (
        "remotes: [nas, s3]",
        "remotes: [nas, s4]",
        6,
        "remotes[1]: unknown remote 's4' (known: nas, offsite, s3)",
    ),
    (
        "{type: files, root: /srv/vms}",
        "{type: xen, root: /srv/vms}",
        7,
        "connector: unknown connector 'xen'",
    ),
    (
        "targets: [offsite]",
        "targets: [nas]",
        49,
        "mirror 'offsite-copy': targets[0]: 'nas' is the mirror's own source",
    ),
    (
        "jobs: [nightly, offsite-copy, config]",
        "jobs: [nightly, weekend]",
        70,
        "sequence 'weekend': jobs[1]: the sequence includes itself (weekend -> weekend)",
    ),
    (
        "jobs: [nightly, offsite-copy, config]",
        "jobs: [nightly, nope]",
        70,
        "jobs[1]: unknown job 'nope'",
    ),
    (
        "name: hourly",
        "name: daily",
        22,
        "schedules[1].name: schedule 'daily' is defined twice in this job",
    ),
    (
        "name: standby",
        "name: nightly",
        37,
        "replication 'nightly': name: job 'nightly' is defined twice (first at line 3)",
    ),
    (
        "compression_level: 3",
        "compression_level: -1",
        15,
        "compression_level: Input should be greater than or equal to 0",
    ),
    (
        "    keep: 24",
        "    keep: -24",
        24,
        "schedules[1].keep: Input should be greater than or equal to 1",
    ),
    (
        "concurrency: {vms: 4,",
        "concurrency: {vms: 0,",
        30,
        "concurrency.vms: Input should be greater than or equal to 1",
    ),
    ("max_rate: 50MiB/s", "max_rate: fast", 33, "max_rate: 'fast' is not a rate such as 50MiB/s"),
    ("max_rate: 50MiB/s", "max_rate: -5", 33, "max_rate: must be a positive rate"),
    ("vm_timeout: 2h", "vm_timeout: 2 hours", 31, "vm_timeout: '2 hours' is not a duration"),
    (
        "timezone: Europe/Paris\n    keep",
        "timezone: Mars/Olympus\n    keep",
        20,
        "schedules[0].timezone: unknown time zone 'Mars/Olympus'",
    ),
    ("power: any", "power: sleeping", 14, "vms.power: must be 'running', 'stopped' or 'any'"),
    (
        "  - {name: every-4h,",
        "  - {name: every-4h, keep: 3,",
        44,
        "replication 'standby': schedules[0].keep: unknown key",
    ),
    ("keep: 5\n", "keep: 12\n", 42, "replication 'standby': keep: at most 9 rollback snapshots"),
    (
        "retention: {keep_last: 30}",
        "retention: {keep_last: 0}",
        64,
        "metadata 'config': retention: keeps nothing",
    ),
    (
        "    - tags: [prod]",
        '    - tags: ["two words"]',
        11,
        "vms.include[1].tags[0]: 'two words' is not a tag",
    ),
    ("    - name: web-test", "    - {}", 13, "vms.exclude[0]: a rule needs name, uuid or tags"),
    ("kind: metadata", "kind: snapshot", 59, "job 'config': kind: unknown kind 'snapshot'"),
]


@pytest.mark.parametrize(("old", "new", "line", "text"), BAD, ids=[b[3][:40] for b in BAD])
def test_bad_input_names_file_line_and_field(old: str, new: str, line: int, text: str) -> None:
    assert ALL_KINDS.count(old) == 1, old
    message = _error(ALL_KINDS.replace(old, new))
    assert message.startswith(f"jobs.yaml:{line}: "), message
    assert text in message, message


def test_malformed_yaml_names_the_line() -> None:
    message = _error(ALL_KINDS.replace("retries: {count: 2, backoff: 5m}", "retries: {count: 2"))
    assert message == (
        "jobs.yaml:33: malformed YAML: expected ',' or '}', but got ':' "
        "(while parsing a flow mapping at line 32)"
    )


def test_a_key_given_twice_is_refused() -> None:
    message = _error(ALL_KINDS.replace("prune: true", "prune: true\nprune: false"))
    assert message.startswith(
        "jobs.yaml:29: malformed YAML: key 'prune' given twice (first at line 28)"
    ), message


def test_a_cycle_through_another_sequence_and_stored_jobs() -> None:
    stored = _load(ALL_KINDS)
    outer = "kind: sequence\nname: outer\njobs: [weekend]\n"
    (job,) = load_jobs(outer, "outer.yaml", remotes=REMOTES, known_jobs={j.name: j for j in stored})  # type: ignore[attr-defined]
    assert job.kind == "sequence"
    # weekend now includes outer, which includes weekend: refused in either file order.
    text = ALL_KINDS.replace("jobs: [nightly, offsite-copy, config]", "jobs: [nightly, outer]")
    message = _error(text + "---\n" + outer)
    assert (
        "sequence 'weekend': jobs[1]: the sequence includes itself (weekend -> outer -> weekend)"
        in message
    )


def test_unknown_remote_without_any_remote_says_how_to_add_one() -> None:
    with pytest.raises(JobSpecError, match=r"unknown remote 'nas' \(known: none yet"):
        load_jobs(ALL_KINDS, "jobs.yaml", remotes=[])


def test_unknown_report_target_when_targets_are_known() -> None:
    with pytest.raises(
        JobSpecError, match=r"^jobs.yaml:34: .*report.webhook\[0\]: unknown report target 'chat'"
    ):
        load_jobs(ALL_KINDS, "jobs.yaml", remotes=REMOTES, report_targets=["ops"])


def test_a_document_that_is_not_a_job() -> None:
    assert _error("- a\n- b\n").startswith("jobs.yaml:1: document 1: must be a mapping")
    assert _error("# nothing\n") == "jobs.yaml: no job in the file"
    assert _error("kind: backup\nname: x\n").startswith("jobs.yaml:1: backup 'x': ")


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("5m", 300), ("1h30m", 5400), ("2d", 172800), (45, 45)]
)
def test_durations(text: object, seconds: int) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("50MiB/s", 50 << 20),
        ("10MB/s", 10_000_000),
        ("2G", 2_000_000_000),
        (4096, 4096),
        ("1.5KiB/s", 1536),
    ],
)
def test_rates(text: object, rate: int) -> None:
    assert parse_rate(text) == rate


def test_the_examples_in_docs_load() -> None:
    """Every YAML example of docs/JOBS.md that is a whole job loads (known remotes given)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "JOBS.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if b.startswith("kind:")]
    assert len(blocks) == 5
    jobs = load_jobs("---\n".join(blocks), "JOBS.md", remotes=REMOTES)
    assert {j.kind for j in jobs} == {"backup", "replication", "mirror", "metadata", "sequence"}
