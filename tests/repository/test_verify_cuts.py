"""verify's groups are cut where data packs end and formed in one order whatever the order
the chunks came in: each data pack is read with one ranged GET, each recipe pack with one
whole GET, however many groups are in flight, and the same requests on every run."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.repository.spy_remote import CountingRemote, tiny_point
from tests.repository.test_packs import packed_repo, reopen, store
from vmkeep.fetch_pipeline import FetchDecode, PipelineStats, pipelined_map
from vmkeep.parallel import cpu_count
from vmkeep.progress import SilentProgress
from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE
from vmkeep.repository.chunk_fetch import FetchedChunks
from vmkeep.repository.packs import pack_object_name
from vmkeep.repository.repository import Repository
from vmkeep.repository.verify import in_pack_order, verify
from vmkeep.repository.verify_groups import check_grouped, group_aim, plan_groups, window_bytes

KiB, MiB = 1 << 10, 1 << 20
START = datetime(2026, 3, 1, tzinfo=UTC)


class PackReads(CountingRemote):
    """Counts each pack's whole reads (get_bounded's: from 0, longer than a pack) and
    ranged reads (O_DIRECT ones too), by object name."""

    def __init__(self, inner: object, pack_size: int) -> None:
        super().__init__(inner)  # type: ignore[arg-type]
        self.pack_size = pack_size
        self.whole: Counter[str] = Counter()
        self.ranged: Counter[str] = Counter()

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if name.startswith("packs/"):
            whole = offset == 0 and (length is None or length > self.pack_size)
            with self._lock:
                (self.whole if whole else self.ranged)[name] += 1
        return super().get(name, offset, length)

    def __getattr__(self, name: str) -> Any:
        attr = super().__getattr__(name)
        if name == "get_direct":

            def get_direct(name: str, offset: int, into: memoryview) -> memoryview | None:
                with self._lock:
                    self.ranged[name] += 1
                got: memoryview | None = attr(name, offset, into)
                return got

            return get_direct
        return attr


def _points(tmp_path: Path, points: int, datas: int, size: int) -> tuple[Repository, list[bytes]]:
    """`points` flushes of `datas` random chunks of `size` bytes, a point each."""
    repo = packed_repo(tmp_path / "r", pack_size=MiB)
    rng = random.Random(5)
    ids: list[bytes] = []
    for p in range(points):
        chunk_ids = store(repo, [rng.randbytes(size) for _ in range(datas)])
        tiny_point(repo, p, START + timedelta(hours=p), chunk_ids)
        ids += chunk_ids
    return reopen(repo), ids


def _packs_of(repo: Repository, kind: int, chunk_ids: list[bytes]) -> set[str]:
    assert repo.packed is not None
    index, names = repo.packed.index(), set()
    for chunk_id in chunk_ids:
        blob_ids = [chunk_id] if kind == KIND_RECIPE else repo.packed.recipe_of(chunk_id)[1]
        for blob_id in blob_ids:
            entry = index.get(kind, blob_id)
            assert entry is not None
            names.add(pack_object_name(entry.pack))
    return names


def _spied_verify(repo: Repository) -> PackReads:
    spy = PackReads(repo.remote, repo.config["pack_size"])
    report = verify(Repository(spy, repo.config, repo.key), None, SilentProgress())  # type: ignore[arg-type]
    assert report.ok
    return spy


def test_each_pack_is_read_once_with_groups_in_flight(tmp_path: Path) -> None:
    """24 points of 3 chunks of one 64 KiB block: a recipe pack and a data pack each. A
    group (a pack's worth: 1 MiB) reads three points' packs, and four groups are in flight:
    with recipes read by the fetches into a cache of two packs, a recipe pack was read
    again now and then; with groups of 4 chunks, most data packs were read twice."""
    repo, ids = _points(tmp_path, 24, 3, 64 * KiB)
    recipe_packs = _packs_of(repo, KIND_RECIPE, ids)
    data_packs = _packs_of(repo, KIND_BLOCK, ids)
    assert len(recipe_packs) == len(data_packs) == 24
    assert repo.packed is not None
    groups = list(plan_groups(repo.packed, in_pack_order(repo, ids)))
    assert len(groups) == 8 and all(len(g.chunk_ids) == 9 for g in groups)
    spy = _spied_verify(repo)
    assert spy.whole == Counter(dict.fromkeys(recipe_packs, 1))
    assert spy.ranged == Counter(dict.fromkeys(data_packs, 1))


def test_same_order_groups_and_requests_whatever_the_order_given(tmp_path: Path) -> None:
    """The chunks come from a set (hash order, seeded per process): the order, and so the
    groups and the requests, must not depend on it."""
    repo, ids = _points(tmp_path, 6, 5, 5 * 64 * KiB)
    assert repo.packed is not None
    order = in_pack_order(repo, ids)
    assert in_pack_order(repo, ids[::-1]) == order
    assert in_pack_order(repo, sorted(ids)) == order
    groups = [g.chunk_ids for g in plan_groups(repo.packed, order)]
    assert [g.chunk_ids for g in plan_groups(repo.packed, in_pack_order(repo, ids[::-1]))] == groups
    first, again = _spied_verify(repo), _spied_verify(reopen(repo))
    assert first.whole == again.whole and first.ranged == again.ranged
    assert sum(first.ranged.values()) == len(_packs_of(repo, KIND_BLOCK, ids))


def test_compressible_chunks_are_cut_by_weight(tmp_path: Path) -> None:
    """Text compresses: one 1 MiB pack holds many chunks' blocks, so groups are cut by
    their plaintext (at most twice the aim), not at the pack's end; every chunk checked."""
    repo = packed_repo(tmp_path / "r", pack_size=MiB)
    datas = [(b"line %06d of text\n" % i) * (320 * KiB // 19) for i in range(20)]
    ids = store(repo, datas)
    repo = reopen(repo)
    assert repo.packed is not None
    assert len(_packs_of(repo, KIND_BLOCK, ids)) == 1
    aim = group_aim(repo.packed)
    groups = list(plan_groups(repo.packed, in_pack_order(repo, ids)))
    assert len(groups) > 1 and all(g.plain <= 2 * aim for g in groups)
    assert sorted(c for g in groups for c in g.chunk_ids) == sorted(ids)
    tiny_point(repo, 0, START, ids)
    spy = _spied_verify(repo)
    assert sum(spy.ranged.values()) == len(groups)
    report = verify(repo, None, SilentProgress())
    assert report.chunks_checked == 20 and report.bytes_checked == sum(map(len, datas))


def test_weighted_window_bounds_the_weight_in_flight() -> None:
    """pipelined_map with weights: at most `window` of weight between fetch and decode end,
    and an item heavier than the window still runs (alone)."""
    lock, state = threading.Lock(), {"now": 0, "peak": 0, "heavy": 0}

    def fetch(w: int) -> int:
        with lock:
            state["now"] += w
            if w > 8:
                state["heavy"] = max(state["heavy"], state["now"])
            else:
                state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.005)
        return w

    def decode(w: int) -> int:
        with lock:
            state["now"] -= w
        return w

    weights = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3] * 4
    stage = FetchDecode(fetch, decode, lambda w: w, 8, 2)
    got = list(pipelined_map(stage, weights, 8, lambda w: w))
    assert sorted(got) == sorted(weights)
    assert state["peak"] <= 8 and state["heavy"] == 9  # the 9 alone


def test_memory_is_the_weighed_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """12 points of 5 chunks of 320 KiB (19 MiB): at most four groups of a pack's worth
    (and a quarter) fetched and not yet decoded, whatever the repository's size. The
    decoders are slowed (the real decode, 20 ms later) so that fetches run ahead of them as
    far as the window lets them."""
    repo, ids = _points(tmp_path, 12, 5, 5 * 64 * KiB)
    assert repo.packed is not None
    decode = repo.decode_chunk_parts

    def slow(fetched: FetchedChunks) -> list[list[bytes]]:
        time.sleep(0.02)
        return decode(fetched)

    monkeypatch.setattr(repo, "decode_chunk_parts", slow)
    stats = PipelineStats()
    order = in_pack_order(repo, ids)
    checked = [r for results in check_grouped(repo, order, stats) for r in results]
    assert sorted(c for c, _, _ in checked) == sorted(ids)
    assert all(error is None for _, _, error in checked)
    window = window_bytes(group_aim(repo.packed), cpu_count())
    assert window == 4 * MiB * 5 // 4 < len(ids) * 5 * 64 * KiB // 3
    assert stats.fetched_items == len(list(plan_groups(repo.packed, order)))
    assert 2 * MiB < stats.peak_queued_bytes <= window
