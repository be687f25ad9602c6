"""gc's external sort of live keys: several spilled runs merge into the sorted set (in
passes when there are many), and the run files are gone afterwards, also after an
exception."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.repository import live_set
from vmkeep.repository.live_set import KEY_SIZE, LiveKeys, live_key

read_run = live_set._read_run


def test_million_keys_with_small_buffer_merge_to_the_sorted_set(tmp_path: Path) -> None:
    rnd = os.urandom(KEY_SIZE * 400_000)
    unique = [rnd[i : i + KEY_SIZE] for i in range(0, len(rnd), KEY_SIZE)]
    keys = unique * 2 + unique[::2] + unique[1::3]  # 1.13 M keys, 400 k distinct
    with LiveKeys(tmp_path, buffer_keys=100_000) as live:
        for key in keys:
            live.add(key)
        assert len(live.runs) >= 10  # really an external sort, not one buffer
        got = list(live.sorted_unique())
        assert len(os.listdir(live.dir)) == len(live.runs)
    assert got == sorted(set(unique))
    assert os.listdir(tmp_path) == []  # run files and their directory removed


def test_run_files_removed_after_an_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), LiveKeys(tmp_path, buffer_keys=10) as live:
        for n in range(100):
            live.add(live_key(1, n.to_bytes(32, "big")))
        assert len(live.runs) == 10
        raise RuntimeError("gc failed mid-way")
    assert os.listdir(tmp_path) == []


def test_empty_set_and_private_directory(tmp_path: Path) -> None:
    with LiveKeys(tmp_path) as live:
        assert (live.dir.stat().st_mode & 0o777) == 0o700
        assert list(live.sorted_unique()) == []
    assert os.listdir(tmp_path) == []


def test_unique_buffer_spills_each_repeated_key_once(tmp_path: Path) -> None:
    """The referenced chunk IDs (gc's mark): points repeat most of them, the set buffer
    writes each once per run, and the merge still yields each once, in order."""
    ids = [os.urandom(32) for _ in range(1000)]
    with LiveKeys(tmp_path, buffer_keys=300, key_size=32, unique=True) as refs:
        for _point in range(20):  # 20 points sharing all their chunks: 20,000 adds
            refs.add_many(ids[:250])
        refs.add_many(ids)
        got = list(refs.sorted_unique())
        written = sum(p.stat().st_size for p in refs.runs) // 32
    assert got == sorted(ids)
    assert len(refs.runs) >= 3 and written < 1500  # not 21,000 keys on disk
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError), LiveKeys(tmp_path, key_size=32, unique=True) as refs:
        refs.add(b"short")


def test_many_runs_merge_in_passes_with_few_open_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More runs than FAN_IN are merged in passes (a read buffer per open run: 6,000 runs
    of one merge took 400 MiB), to the same sorted set, as often as it is asked for."""
    monkeypatch.setattr(live_set, "FAN_IN", 4)
    reading = [0, 0]  # runs open now, most open at once

    def counted(path: Path, size: int) -> Iterator[bytes]:
        reading[0] += 1
        reading[1] = max(reading)
        try:
            yield from read_run(path, size)
        finally:
            reading[0] -= 1

    monkeypatch.setattr(live_set, "_read_run", counted)
    keys = [os.urandom(KEY_SIZE) for _ in range(2000)]
    with LiveKeys(tmp_path, buffer_keys=30) as live:
        live.add_many(keys + keys[::7])
        assert len(live.runs) >= 70  # 70 runs: passes of 4 -> 18 -> 5 -> 2
        got = list(live.sorted_unique())
        assert got == list(live.sorted_unique()) == sorted(keys)
        assert reading[1] <= 4 and len(os.listdir(live.dir)) <= 4  # merged inputs removed
    assert os.listdir(tmp_path) == []
