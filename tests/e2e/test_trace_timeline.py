"""VMKEEP_TRACE=path writes a timeline of a backup or restore (vmkeep/trace.py): the phases in
the order they ran, and the per-chunk reads, CPU-gate slots and pack writes, each begun before
it ended; unset, nothing is written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.e2e.conftest import Cli


def events(path: Path) -> list[tuple[float, str, str]]:
    out = []
    for line in path.read_text().splitlines():
        at, thread, event = line.split(" ", 2)
        out.append((float(at), thread, event))
    return out


def first(evs: list[tuple[float, str, str]], name: str) -> float:
    return next(at for at, _, event in evs if event == name)


def balanced(evs: list[tuple[float, str, str]], name: str) -> int:
    """How many `name` spans there were; each thread's `+` comes before its `-`."""
    depth: dict[str, int] = {}
    count = 0
    for _, thread, event in evs:
        if event == name + "+":
            depth[thread] = depth.get(thread, 0) + 1
            count += 1
        elif event == name + "-":
            depth[thread] -= 1
            assert depth[thread] >= 0, f"{name} ended before it began on {thread}"
    assert all(d == 0 for d in depth.values()), f"{name} left open: {depth}"
    return count


def test_backup_and_restore_timelines(
    tmp_path: Path, cli: Cli, make_vm: Callable[..., Path]
) -> None:
    vm = make_vm(size=32 * 1024 * 1024)
    repo = tmp_path / "repo"
    cli("init", str(repo), "--format", "3")
    untraced = cli("backup", str(vm), "--remote", str(repo), "--json").json()
    assert not list(tmp_path.glob("*.trace"))
    trace = tmp_path / "backup.trace"
    cli("backup", str(vm), "--remote", str(repo), "--json", env={"VMKEEP_TRACE": str(trace)})
    evs = events(trace)
    order = ["cli", "opened", "backup_vm", "locked", "begin_backup+", "begin_backup-",
             "stored", "flush+", "flush-", "manifest", "finish+", "finish-"]  # fmt: skip
    times = [first(evs, name) for name in order]
    assert times == sorted(times), list(zip(order, times, strict=True))
    assert [at for at, _, _ in evs] == sorted(at for at, _, _ in evs)
    assert balanced(evs, "read") == untraced["chunks"]  # one read per chunk with data
    assert balanced(evs, "gate") >= untraced["chunks"]
    balanced(evs, "index.write")

    point = untraced["restore_point"]
    trace = tmp_path / "restore.trace"
    to = tmp_path / "restored"
    cli("restore", point, "--remote", str(repo), "--to", str(to), env={"VMKEEP_TRACE": str(trace)})
    evs = events(trace)
    order = ["cli", "imported", "opened", "restore_vm", "manifest", "data", "committed"]
    times = [first(evs, name) for name in order]
    assert times == sorted(times), list(zip(order, times, strict=True))
    assert balanced(evs, "fetch") == balanced(evs, "decode") > 0
