"""Private index directories of killed processes are removed by the next process, and
nothing else is (private_tmp.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from vmkeep.private_tmp import PREFIX, remove_dead, start_time


def test_only_directories_of_processes_gone_are_removed(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    me = os.getpid()
    names = {
        "dead": f"{PREFIX}{gone.pid}-{start_time(me)}-abcdefgh",
        "reused": f"{PREFIX}{me}-1-abcdefgh",  # our pid, another start time: a dead owner
        "alive": f"{PREFIX}{me}-{start_time(me)}-abcdefgh",
        "old": f"{PREFIX}abcdefgh",  # an older version's name: nothing tells its owner
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "blobindex").write_bytes(b"x" * 100)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    link = tmp_path / f"{PREFIX}{gone.pid}-7-linklink"
    link.symlink_to(outside)
    assert remove_dead(tmp_path) == 2
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([names["alive"], names["old"], link.name, "outside"])
    assert (outside / "keep").read_text() == "keep"  # never through a symlink
